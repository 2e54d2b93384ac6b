//! The continuous-batching scheduler gives every sequence exactly what it would get alone:
//! many requests of different lengths, fewer slots than requests, a small token budget that
//! splits prompts into chunks mixed with other sequences' decode steps.

use std::sync::mpsc;
use std::sync::Arc;

use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::scheduler::{
    EventSink, NoObserver, Scheduler, SchedulerConfig, SeqEvent, SeqRequest, SubmitError,
};
use switchyard_engine::{FinishReason, GenerateRequest};
use switchyard_tests::*;

struct Chan(mpsc::Sender<SeqEvent>);
impl EventSink for Chan {
    fn send(&mut self, ev: SeqEvent) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

fn collect(rx: mpsc::Receiver<SeqEvent>) -> (Vec<u32>, String, FinishReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    for ev in rx {
        match ev {
            SeqEvent::Started { .. } => {}
            SeqEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            SeqEvent::Finished {
                reason,
                text: t,
                completion_tokens,
                ..
            } => {
                text.push_str(&t);
                assert_eq!(completion_tokens, ids.len());
                return (ids, text, reason);
            }
            SeqEvent::Failed(m) => panic!("{m}"),
        }
    }
    panic!("no Finished event");
}

#[test]
fn batched_sequences_match_solo_generation() {
    let path = stories_dir();
    let prompts = [
        "Once upon a time",
        "The little dog ran to the park and saw a big red ball. He wanted to play with it",
        "Lily",
        "One day, a boy named Tim went to the store with his mom. They bought apples",
        "The sun",
        "A cat sat on the mat",
    ];
    let params: Vec<(SamplingParams, usize, Vec<String>)> = (0..prompts.len())
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams {
                    temperature: 0.9,
                    top_k: 40,
                    top_p: 0.95,
                    seed: 7 + i as u64,
                }
            };
            let stop = if i == 2 {
                vec!["park".to_string()]
            } else {
                vec![]
            };
            (sampling, 20 + 13 * i, stop)
        })
        .collect();

    // Alone, one at a time.
    let mut solo = load(&path, 2, 1);
    let want: Vec<_> = prompts
        .iter()
        .zip(&params)
        .map(|(p, (s, max, stop))| {
            let req = GenerateRequest {
                prompt: solo.encode_prompt(p).unwrap(),
                max_tokens: *max,
                sampling: s.clone(),
                stop: stop.clone(),
            };
            let out = solo.generate(&req, &mut |_| {}).unwrap();
            (out.tokens, out.text, out.finish)
        })
        .collect();

    // Together: 3 slots for 6 requests, 8 tokens per step.
    let engine = load(&path, 2, 3);
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine.encode_prompt(p).unwrap())
        .collect();
    let cfg = SchedulerConfig {
        step_tokens: 8,
        max_waiting: 16,
    };
    let (h, join) = Scheduler::spawn(engine, cfg, Arc::new(NoObserver), "test").unwrap();
    let mut rxs = Vec::new();
    for (i, (s, max, stop)) in params.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        h.submit(vec![SeqRequest {
            prompt: ids[i].clone(),
            max_tokens: *max,
            sampling: s.clone(),
            stop: stop.clone(),
            logprobs: None,
            sink: Box::new(Chan(tx)),
        }])
        .unwrap();
        rxs.push(rx);
    }
    for (i, rx) in rxs.into_iter().enumerate() {
        let got = collect(rx);
        assert_eq!(got, want[i], "request {i} ({:?})", prompts[i]);
    }
    drop(h);
    join.join().unwrap();
}

#[test]
fn queue_bound_refuses_all_or_nothing() {
    let engine = load(&stories_dir(), 1, 1);
    let prompt = engine.encode_prompt("Once upon a time").unwrap();
    let cfg = SchedulerConfig {
        step_tokens: 64,
        max_waiting: 2,
    };
    let (s, h) = Scheduler::new(engine, cfg, Arc::new(NoObserver));
    // The scheduler is not running yet: everything submitted waits.
    let req = |tx: mpsc::Sender<SeqEvent>| SeqRequest {
        prompt: prompt.clone(),
        max_tokens: 4,
        sampling: SamplingParams::default(),
        stop: vec![],
        logprobs: None,
        sink: Box::new(Chan(tx)),
    };
    let (tx, rx) = mpsc::channel();
    h.submit(vec![req(tx.clone())]).unwrap();
    let e = h
        .submit(vec![req(tx.clone()), req(tx.clone())])
        .unwrap_err();
    assert_eq!(
        e,
        SubmitError::QueueFull {
            waiting: 1,
            max_waiting: 2
        }
    );
    h.submit(vec![req(tx.clone())]).unwrap();
    assert_eq!(h.waiting(), 2);
    drop(tx);
    let t = std::thread::spawn(move || s.run());
    drop(h);
    let finished = rx
        .iter()
        .filter(|e| matches!(e, SeqEvent::Finished { .. }))
        .count();
    assert_eq!(finished, 2);
    t.join().unwrap();
}
