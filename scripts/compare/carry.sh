#!/usr/bin/env bash
# Carries a comparison through the repository, for runs longer than one machine's lease:
#   scripts/compare/carry.sh save OUT RESULTS      # OUT's report and runs -> RESULTS (commit it)
#   scripts/compare/carry.sh restore RESULTS OUT   # on the next machine, then run.sh SPEC OUT
# A finished run travels as result.json + compare-config.toml (what `memvp compare` reports it
# from) with eval.json, curve.jsonl and train_summary.json for people to check. An unfinished
# one travels as RESULTS/NAME/unfinished/: its settings, metrics.jsonl (the training time so
# far), held-out curve and evaluations, and its newest checkpoint (adapter + AdamW state, 6.7 MB
# for input-space+LoRA), which `memvp compare` resumes like any stopped run.
set -euo pipefail
usage() { echo "usage: $0 save OUT RESULTS | restore RESULTS OUT" >&2; exit 2; }
[ $# -eq 3 ] || usage
mode=$1 from=$2 to=$3
case $mode in save | restore) ;; *) usage ;; esac
[ -d "$from" ] || { echo "$0: $from: no such directory" >&2; exit 1; }

# The newest complete checkpoint of a run directory: "STEP DIRNAME" ("0 -" when none).
newest_checkpoint() {
    local best=0 name=- d s
    for d in "$1"/checkpoints/step-*; do
        [ -f "$d/state.json" ] || continue
        s=$((10#${d##*/step-}))
        if [ "$s" -gt "$best" ]; then best=$s name=${d##*/}; fi
    done
    echo "$best $name"
}

# A comparison still running would be carried mid-write: refused, as `memvp compare` refuses a
# second writer (the same advisory lock on OUT/.lock).
not_running() {
    if [ -f "$1/.lock" ] && ! flock -n "$1/.lock" true; then
        echo "$0: $1 is in use by memvp (PID $(cat "$1/.lock")); stop it (Ctrl-C) first" >&2
        exit 1
    fi
}

copy_if() { if [ -e "$1" ]; then cp "$1" "$2"; fi; }

save() {
    local out=$1 res=$2 run name dest step ck tmp e
    [ -d "$out/runs" ] || { echo "$0: $out/runs: no such directory (not a comparison's OUT)" >&2; exit 1; }
    not_running "$out"
    mkdir -p "$res"
    for f in compare.json compare.md compare.png; do copy_if "$out/$f" "$res/$f"; done
    for run in "$out"/runs/*/; do
        run=${run%/} name=${run##*/} dest=$res/$name
        if [ -f "$run/result.json" ]; then
            mkdir -p "$dest"
            for f in result.json compare-config.toml curve.jsonl train_summary.json; do copy_if "$run/$f" "$dest/$f"; done
            copy_if "$run/final/eval.json" "$dest/eval.json"
            rm -rf "$dest/unfinished"
            echo "$name: finished, carried as $dest/result.json"
            continue
        fi
        read -r step ck < <(newest_checkpoint "$run")
        if [ "$step" -eq 0 ]; then
            echo "$name: no checkpoint yet, nothing to carry"
            continue
        fi
        # Built beside and swapped in, so an interrupted save leaves the previous carry whole.
        tmp=$dest/.unfinished.tmp
        rm -rf "$tmp" && mkdir -p "$tmp/checkpoints"
        for f in compare-config.toml config.toml metrics.jsonl curve.jsonl train_summary.json trained; do
            copy_if "$run/$f" "$tmp/$f"
        done
        cp -r "$run/checkpoints/$ck" "$tmp/checkpoints/"
        for e in "$run"/evals/step-*/eval.json; do
            [ -f "$e" ] || continue
            e=${e%/eval.json}
            mkdir -p "$tmp/evals/${e##*/}" && cp "$e/eval.json" "$tmp/evals/${e##*/}/"
        done
        rm -rf "$dest/unfinished" && mv "$tmp" "$dest/unfinished"
        echo "$name: unfinished at step $step, carried as $dest/unfinished ($(du -sh "$dest/unfinished" | cut -f1))"
    done
}

restore() {
    local res=$1 out=$2 d name target have step ck _
    if [ -d "$out" ]; then not_running "$out"; fi
    for d in "$res"/*/; do
        d=${d%/} name=${d##*/} target=$out/runs/$name
        if [ -f "$d/result.json" ]; then
            if [ -f "$target/result.json" ]; then echo "$name: already finished in $target"; continue; fi
            [ -f "$d/compare-config.toml" ] || { echo "$0: $d/result.json has no compare-config.toml beside it" >&2; exit 1; }
            mkdir -p "$target" && cp "$d/result.json" "$d/compare-config.toml" "$target/"
            echo "$name: finished (restored its result)"
        elif [ -d "$d/unfinished" ]; then
            read -r step ck < <(newest_checkpoint "$d/unfinished")
            [ "$step" -gt 0 ] || { echo "$0: $d/unfinished has no complete checkpoint" >&2; exit 1; }
            read -r have _ < <(newest_checkpoint "$target")
            if [ -f "$target/result.json" ] || [ "$have" -ge "$step" ]; then
                echo "$name: $target is already at step $have (carried: $step), left as it is"
                continue
            fi
            mkdir -p "$target" && cp -r "$d/unfinished/." "$target/"
            # The run's top level holds its newest adapter (what `memvp eval --run` reads): the
            # checkpoint's own copy, so it is not carried twice.
            cp "$target/checkpoints/$ck"/adapter_* "$target/"
            echo "$name: restored at step $step; run.sh continues it"
        fi
    done
}

case $mode in
    save) save "$from" "$to" ;;
    restore) restore "$from" "$to" ;;
esac
