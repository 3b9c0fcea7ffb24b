#!/usr/bin/env bash
# Packaging check: what `pip install hf_fadam-*.whl` gives a user, not what the editable checkout gives the tests.
#
#   1. `python -m build` makes the sdist, then the wheel from the sdist; `twine check --strict` passes on both.
#   2. The wheel holds the package with its C kernel sources and the start-up hook `hf_fadam_autoload.pth` at the top
#      of site-packages; the sdist also holds the examples with their `evaluate` metric modules, the model-card
#      template and the tests.
#   3. In a fresh venv (outside the repository): `pip install torch==2.13.0 <wheel>[hf]` in one command; hf_fadam
#      imports from site-packages, the hook makes a stock `TrainingArguments(optim="fadam")` valid without any
#      `register()`, and a stock Trainer script that never imports hf_fadam trains 2 steps with `--optim fadam`.
#
# Usage: bash .ci/package_check.sh   (uses .venv/bin/python, which needs `build` and `twine`: the dev extra;
# PYTHON=... picks another). About 2-4 minutes, most of it the fresh venv's install.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-$REPO/.venv/bin/python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hf_fadam-package.XXXXXX")"   # outside the repo: nothing can import the checkout
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

step "build (sdist, then the wheel from the sdist)"
if ! "$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1; then
    cat "$WORK/build.log"
    exit 1
fi
WHEEL="$(ls "$WORK"/dist/hf_fadam-*.whl)"
SDIST="$(ls "$WORK"/dist/hf_fadam-*.tar.gz)"
ls -l "$WORK/dist"

step "twine check"
"$PY" -m twine check --strict "$WHEEL" "$SDIST"

step "members"
"$PY" - "$WHEEL" "$SDIST" <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist = sys.argv[1:]
wheel_names = set(zipfile.ZipFile(wheel).namelist())
root = sdist.rsplit("/", 1)[-1].removesuffix(".tar.gz") + "/"
sdist_names = {n.removeprefix(root) for n in tarfile.open(sdist).getnames()}
kernels = ["hf_fadam/kernels/_fadam_cpu.c", "hf_fadam/kernels/_fadam8bit_cpu.c", "hf_fadam/kernels/cpu_fused.py"]
metrics = [f"examples/metrics/{m}/{m}.py" for m in ("accuracy", "cer", "f1", "perplexity", "wer")]
expected = {
    "wheel": (wheel_names, ["hf_fadam_autoload.pth", "hf_fadam/__init__.py", "hf_fadam/integrations/autoload.py",
                            *kernels]),
    "sdist": (sdist_names, ["pyproject.toml", "README.md", "hf_fadam/integrations/hf_fadam_autoload.pth", *kernels,
                            "examples/metrics/__init__.py", *metrics, "examples/model_card.py",
                            "model_cards/template.md", "tests/trainer_scripts/stock_clm.py"]),
}
problems = [f"{kind} lacks {name}" for kind, (names, wanted) in expected.items() for name in wanted if name not in names]
# The wheel is the package and its hook only: no examples, tests or stray top-level modules in site-packages.
stray = sorted(n for n in wheel_names if not n.startswith(("hf_fadam/", "hf_fadam-")) and n != "hf_fadam_autoload.pth")
problems += [f"wheel has a stray member {n}" for n in stray]
problems += [f"sdist has a stray member {n}" for n in sorted(sdist_names) if "__pycache__" in n or n.endswith(".pyc")]
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
print(f"OK: wheel {len(wheel_names)} members, sdist {len(sdist_names)} members")
EOF

step "fresh venv: the wheel and torch==2.13.0 in one pip command"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin"
# torch pinned in the same command: left alone, pip would resolve the wheel's `torch>=2.4` to a multi-GB CUDA build.
"$V/pip" install -q --no-compile torch==2.13.0 "$WHEEL[hf]"
cd "$WORK"   # so that `import hf_fadam` cannot find the checkout

step "import, and the start-up hook in a stock TrainingArguments"
"$V/python" - <<'EOF'
import os
import sys
import sysconfig

site = sysconfig.get_paths()["purelib"]
assert os.path.isfile(os.path.join(site, "hf_fadam_autoload.pth")), "hf_fadam_autoload.pth is not in site-packages"
from transformers import TrainingArguments  # noqa: E402  (no hf_fadam import, no register())

args = TrainingArguments(output_dir="out", optim="fadam", report_to="none")
import hf_fadam  # noqa: E402

assert hf_fadam.__file__.startswith(site), f"hf_fadam imported from {hf_fadam.__file__}, not from {site}"
print(f"OK: hf_fadam {hf_fadam.__version__} from {hf_fadam.__file__}; TrainingArguments(optim='fadam').optim =",
      repr(args.optim), file=sys.stderr)
EOF

step "a stock Trainer script with --optim fadam (2 steps)"
"$V/python" "$REPO/tests/trainer_scripts/stock_clm.py" --output_dir "$WORK/run" --optim fadam \
    --optim_args "clip=1.0,p=0.5" --max_steps 2 --logging_steps 1 --report_to none --report_file "$WORK/run/report.json"
"$V/python" - "$WORK/run/report.json" <<'EOF'
import json
import math
import sys

report = json.load(open(sys.argv[1]))
optimizer = report.get("optimizer_class") or report.get("optimizer")
assert "FAdam" in str(optimizer), f"the Trainer built {optimizer!r}, not FAdam"
losses = [row["loss"] for row in report["log_history"] if "loss" in row]
assert losses and all(math.isfinite(x) for x in losses), report["log_history"]
print(f"OK: the Trainer built {optimizer}; losses {losses}")
EOF
echo "== package check passed in $((SECONDS - start)) s"
