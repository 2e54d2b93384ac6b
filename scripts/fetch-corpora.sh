#!/usr/bin/env bash
# Domain corpora for AdaptiVocab (not needed by the tests):
#  - Debian's linux-doc-6.1 (GPL-2): the kernel's .rst documentation, gzipped, outside
#    Documentation/translations/. Split by sorted path: every 10th file is held out.
#      .cache/corpora/linux-doc/train/  (links, ~90 % of the files: build patches from these)
#      .cache/corpora/linux-doc/test/   (links, ~10 %: measure on these)
#  - Debian's python3.11-doc (PSF license): the .rst.txt sources of the Python docs, the same
#    split, in .cache/corpora/python-doc/{train,test}/.
#  - Generic English: Debian's fortunes and fortunes-min (BSD-style / public domain quotations
#    and prose), the plain files, in .cache/corpora/generic/{train,test}/.
# Needs apt-get (Debian/Ubuntu) to download the packages; nothing is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
C="${SWITCHYARD_CACHE:-$ROOT/.cache}/corpora"
mkdir -p "$C"
cd "$C"
if [ ! -f .extracted ]; then
  echo "downloading linux-doc-6.1, python3.11-doc, fortunes (Debian) ..." >&2
  apt-get download linux-doc-6.1 python3.11-doc fortunes fortunes-min >&2
  for d in linux-doc-6.1_*.deb python3.11-doc_*.deb fortunes*.deb; do dpkg-deb -x "$d" x; done
  touch .extracted
fi
split() { # NAME DIR FIND-ARGS...
  local name=$1 dir=$2; shift 2
  rm -rf "$name"; mkdir -p "$name/train" "$name/test"
  local i=0
  while IFS= read -r f; do
    local rel=${f#"$dir"/}
    local flat=${rel//\//__}
    if (( i % 10 == 0 )); then ln -s "$f" "$name/test/$flat"; else ln -s "$f" "$name/train/$flat"; fi
    i=$((i + 1))
  done < <(find "$dir" "$@" | LC_ALL=C sort)
  echo "$name: $(ls "$name/train" | wc -l) train files, $(ls "$name/test" | wc -l) test files" >&2
}
split linux-doc "$C/x/usr/share/doc/linux-doc-6.1/Documentation" -type f -name '*.rst.gz' -not -path '*/translations/*'
split python-doc "$C/x/usr/share/doc/python3.11/html/_sources" -type f -name '*.rst.txt'
split generic "$C/x/usr/share/games/fortunes" -type f -not -name '*.dat' -not -name '*.u8'
