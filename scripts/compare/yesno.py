#!/usr/bin/env python3
"""How a trained run answers easy-VQA's yes/no questions: from the image or from the wording.

easy-VQA asks "does the image contain a blue shape?" and "is there not a blue shape?"; with
eight colours and three shapes a positive question is mostly answered "no" and a negated one
"yes", so the wording alone scores ~82%. This splits a run's yes/no predictions by question kind
(colour / shape), negation and true answer, and counts how many follow the wording rule.

    python3 scripts/compare/yesno.py RUN/final/preds.json EASYVQA_DATA_DIR [--split train|test]

preds.json maps `SPLIT-INDEX` (the question's index in SPLIT/questions.json) to the answer.
"""
import argparse
import collections
import json
import os

COLOURS = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]


def negated(q):
    return " not " in f" {q} " or " no " in f" {q} "


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preds")
    ap.add_argument("data")
    a = ap.parse_args()
    preds = json.load(open(a.preds))
    questions = {}
    table = collections.Counter()
    for key, pred in preds.items():
        split, idx = key.rsplit("-", 1)
        if split not in questions:
            questions[split] = json.load(open(os.path.join(a.data, split, "questions.json")))
        q, truth, _ = questions[split][int(idx)]
        if truth not in ("yes", "no"):
            continue
        kind = "colour" if any(c in q.split() for c in COLOURS) else "shape"
        table[(kind, negated(q), truth, pred.strip().lower())] += 1
    n = sum(table.values())
    if n == 0:
        raise SystemExit(f"{a.preds}: no yes/no questions")
    rule = sum(v for (k, neg, t, p), v in table.items() if p == ("yes" if neg else "no"))
    correct = sum(v for (k, neg, t, p), v in table.items() if p == t)
    print("| kind | negated | truth | predicted | count |")
    print("| --- | --- | --- | --- | ---: |")
    for (kind, neg, truth, pred), v in sorted(table.items()):
        # A generation that did not stop spans lines; keep it on one table row.
        shown = pred.replace("\n", "\\n").replace("|", "\\|")
        print(f"| {kind} | {'yes' if neg else 'no'} | {truth} | {shown} | {v} |")
    print(f"\n{n} yes/no questions: {100 * correct / n:.2f}% correct; "
          f"{100 * rule / n:.2f}% of the answers follow the wording rule "
          "(positive question -> no, negated -> yes)")


if __name__ == "__main__":
    main()
