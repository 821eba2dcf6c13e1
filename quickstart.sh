#!/usr/bin/env bash
# Set up everything on a fresh machine (Python 3.10+), then run the main job or the tests.
#   bash quickstart.sh train   # a 2-peer DML cohort on Fashion-MNIST on an embedded Ray
#   bash quickstart.sh test    # the test suite
# Extra arguments go to the command, e.g. `bash quickstart.sh train --set train.epochs=2`.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-train}"; shift || true

PY="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "== setting up $VENV (torch, torchvision, ray[train,tune], pandas; a few minutes the first time)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # pip's and setuptools' messages go to a log, shown only if the install fails
    log="$VENV/install.log"
    { "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e ".[test]"; } >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; echo "install failed (all of it: $log)" >&2; exit 1; }
    "$VENV/bin/python" -c "import online_distill, torch, ray" || { echo "install failed" >&2; exit 1; }
    touch "$stamp"
fi

# Fashion-MNIST without internet: Debian ships it (elsewhere torchvision downloads it on first use),
# the word lists of the lang_words text dataset (configs/lang_dml.yaml) and the fortunes corpus
# of the language models (configs/lm_*.yaml).
if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/dict/ngerman ] \
        || [ ! -d /usr/share/games/fortunes ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian's dataset-fashion-mnist, fortunes and word lists (wbritish wfrench wngerman wspanish witalian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
        fortunes wbritish wfrench wngerman wspanish witalian >/dev/null) \
        || echo "   (not available; torchvision will download Fashion-MNIST instead; lang_words needs the word lists, fortunes the language models)"
fi

case "$what" in
    train) exec "$VENV/bin/online-distill" train configs/fmnist_dml.yaml "$@" ;;
    test)  exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: bash quickstart.sh train|test [args...]" >&2; exit 2 ;;
esac
