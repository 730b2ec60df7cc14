#!/usr/bin/env python3
"""Regenerates the scoring fixtures under tests/fixtures/scoring/ with the *official* tools.

This script writes the fixture inputs (built from the case tables below, each case commented
with what it exercises) and the expected outputs produced by the real reference
implementations. The official tools' code is NOT part of this repository ("commit the values,
not those tools' code"); the script loads it from paths you provide:

* VQA: the official Python 2 evaluation code of GT-Vision-Lab/VQA
    PythonEvaluationTools/vqaEvaluation/vqaEval.py  @ a013f0043c1e2cdc995922dfe257f7149aa9af06 (master)
    PythonHelperTools/vqaTools/vqa.py               @ 5e7e7dfbbebae7f329c798c966d9b3c9b61e8cf6 (master)
  put both files in one directory and pass it as --vqa-tools. The script ports them to Python 3
  in memory (see `port_py2_to_py3`): every `print x` statement becomes `print(x)`, and the two
  regexes get `re.ASCII`, because under Python 2 (no re.UNICODE flag) `\\d` only matches ASCII
  digits. Nothing else is changed. Semantic difference that remains: Python 3 `round` rounds
  exact halfway cases to even, Python 2.7 away from zero (round(0.125, 2): 0.12 vs 0.13). The
  committed expectations use Python 3 (as every maintained port and the EvalAI server do); the
  Python 2 numbers are recorded under "_variants"/"python2_round" (the fixture contains such a tie).
* Captions: `pip install pycocoevalcap==1.2` (it ships the Stanford CoreNLP 3.4.1 jar used
  for PTB tokenisation and the METEOR jar) and a Java runtime (tested with OpenJDK 17).
* GQA: the official `eval.py` of the GQA evaluation package (GQA v1.2, distributed at
  https://cs.stanford.edu/people/dorarad/gqa/evaluate.html), passed as --gqa-eval. It is run
  unmodified with runpy; its `scores` dict is read from the module globals.

Re-run (from the repository root):
    python scripts/scoring_reference.py --vqa-tools /path/to/vqa_official --gqa-eval /path/to/eval.py
Requirements: Python >= 3.8, pycocoevalcap 1.2 (+ pycocotools), numpy, tqdm, java on PATH.
"""
import argparse
import copy
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, '..', 'tests', 'fixtures', 'scoring')


def dump(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write('\n')


# =============================================================================================
# VQA
# =============================================================================================

def port_py2_to_py3(src):
    """The only textual changes applied to the official Python 2 sources."""
    out = []
    for line in src.split('\n'):
        m = re.match(r'^(\s*)print (.*)$', line)
        if m:
            line = '%sprint(%s)' % (m.group(1), m.group(2))
        out.append(line)
    src = '\n'.join(out)
    # Python 2 semantics of \d (ASCII only) for the two module regexes.
    n_before = src.count('re.compile(')
    src = src.replace('re.compile("(?!<=\\d)(\\.)(?!\\d)")', 're.compile("(?!<=\\\\d)(\\\\.)(?!\\\\d)", re.ASCII)')
    src = src.replace('re.compile("(\\d)(\\,)(\\d)")', 're.compile("(\\\\d)(\\\\,)(\\\\d)", re.ASCII)')
    if n_before:  # vqaEval.py (vqa.py has no regexes)
        assert src.count('re.ASCII') == 2, 'unexpected vqaEval.py source: regex patch did not apply'
    return src


def py2_round(x, n=0):
    """Python 2.7 float round(): correctly rounded, exact halfway cases away from zero."""
    from decimal import Decimal, ROUND_HALF_UP, ROUND_HALF_EVEN
    d = Decimal(x)  # exact binary value
    q = Decimal(1).scaleb(-n)
    r = d.quantize(q, rounding=ROUND_HALF_UP)  # ties (exact) away from zero
    return float(r)


def load_module(name, path, extra_globals=None):
    with open(path, encoding='utf-8') as f:
        src = f.read()
    src = port_py2_to_py3(src)
    mod = types.ModuleType(name)
    mod.__file__ = path
    if extra_globals:
        mod.__dict__.update(extra_globals)
    sys.modules[name] = mod
    exec(compile(src, path, 'exec'), mod.__dict__)
    return mod


def A(answers, confidences=None):
    """Ten (or more) VQA answer dicts with answer_id 1..n, like the official files."""
    conf = confidences or ['yes', 'yes', 'maybe', 'yes', 'no', 'yes', 'yes', 'maybe', 'yes', 'yes']
    return [{'answer': a, 'answer_confidence': conf[i % len(conf)], 'answer_id': i + 1} for i, a in enumerate(answers)]


def vqa_cases():
    """(question_type, answer_type, question, gt answers, prediction, comment)."""
    c = []
    add = lambda qt, at, q, answers, pred, note: c.append((qt, at, q, answers, pred, note))
    # ---- yes/no ----
    add('is the', 'yes/no', 'Is the man happy?', A(['yes'] * 10), 'yes', 'exact, all 10 identical')
    add('is the', 'yes/no', 'Is the dog asleep?', A(['yes'] * 10), 'Yes', 'QUIRK: 10 identical GT -> no normalisation -> 0')
    add('is this', 'yes/no', 'Is this a kitchen?', A(['yes'] * 10), 'yes.', 'QUIRK: trailing period not stripped -> 0')
    add('is this', 'yes/no', 'Is this outdoors?', A(['no'] * 10), '  no \t', 'surrounding whitespace/tab stripped -> 100')
    add('are there', 'yes/no', 'Are there clouds?', A(['yes'] * 7 + ['no'] * 3), 'Yes.', 'mixed GT -> normalised -> 100')
    add('are there', 'yes/no', 'Are there people?', A(['yes'] * 2 + ['no'] * 8), 'yes', 'two matches -> 60')
    add('does the', 'yes/no', 'Does the bus have a number?', A(['yes'] * 6 + ['no'] * 4), 'yes\n', 'newline in answer -> 100')
    add('is there a', 'yes/no', 'Is there a dog?', A(["don't know"] * 4 + ['dont know'] * 3 + ['no'] * 3), 'dont know', 'contraction dont -> don\'t')
    add('is there a', 'yes/no', 'Is there a cat?', A(["isn't"] * 5 + ['no'] * 5), 'isnt', 'contraction isnt -> isn\'t')
    add('is the', 'yes/no', 'Is the light on?', A(['yes'] * 6 + ['no'] * 4), 'yes' + '.' * 40,
        'QUIRK: at most 32 periods removed (re.UNICODE passed as count) -> 0')
    add('do you', 'yes/no', 'Do you see a tree?', A(['yes'] * 5 + ['Yes'] * 5), 'YES!', 'mixed only by case -> lower-cased -> 100')
    # ---- number ----
    add('how many', 'number', 'How many dogs?', A(['2'] * 10), 'two', 'QUIRK: "two" vs ten identical "2" -> 0')
    add('how many', 'number', 'How many cats?', A(['2'] * 6 + ['two'] * 2 + ['3'] * 2), 'two', 'number word -> digit, 8 matches')
    add('how many', 'number', 'How many birds?', A(['1000'] * 5 + ['1,000'] * 3 + ['one thousand'] * 2), '1,000',
        'digit,digit: punctuation deleted instead of spaced')
    add('how many', 'number', 'How many slices?', A(['3.5'] * 4 + ['3'] * 3 + ['4'] * 3), '3.5', 'decimal point kept')
    add('how many', 'number', 'How many people?', A(['10'] * 5 + ['ten'] * 5), '10.', 'trailing period, ten -> 10')
    add('how many', 'number', 'How many zebras?', A(['0'] * 6 + ['none'] * 4), 'none', 'none -> 0')
    add('what number is', 'number', 'What number is on the bus?', A(['5'] * 6 + ['6'] * 4), '5.', 'period before end removed')
    add('what number is', 'number', 'What number is on the shirt?', A(['0.5'] * 5 + ['.5'] * 5), '.5', '.5 kept (digit follows)')
    add('how many', 'number', 'How many planes?', A(['1'] * 1 + ['2'] * 9), 'one', 'one match -> 30')
    # ---- other ----
    add('what animal is', 'other', 'What animal is this?', A(['dog'] * 6 + ['a dog'] * 2 + ['the dog'] * 2), 'A dog', 'articles removed')
    add('what animal is', 'other', 'What animal is shown?', A(['the dog'] * 10), 'dog', 'QUIRK: identical GT keep the article -> 0')
    add('what is the', 'other', 'What is the man wearing?', A(['t shirt'] * 4 + ['t-shirt'] * 4 + ['shirt'] * 2), 't-shirt', 'hyphen -> space')
    add('what is the', 'other', 'What is the flag?', A(['red and white'] * 5 + ['red white'] * 5), 'red, white', "', ' deleted")
    add('what is the', 'other', 'What is the other flag?', A(['red and white'] * 5 + ['red white'] * 5), 'red,white', "',' -> space")
    add('what brand', 'other', 'What brand is the shoe?', A(['Nike'] * 10), 'nike', 'QUIRK: identical GT are not lower-cased -> 0')
    add('what brand', 'other', 'What brand is the laptop?', A(['apple'] * 4 + ['Apple'] * 3 + ['APPLE'] * 3), 'Apple', 'case-only variants -> 100')
    add('what', 'other', 'What is written on the sign?', A(['ok'] * 5 + ['okay'] * 5), 'ok!', "'!' -> space")
    add('what', 'other', 'What is the dog holding?', A(["dog's toy"] * 5 + ['dogs toy'] * 5), "dogs' toy", "apostrophe is not in the punctuation list -> 0")
    add('which', 'other', 'Which way is the arrow?', A(['left'] * 5 + ['right/left'] * 5), 'right/left', "'/' -> space")
    add('what sport is', 'other', 'What sport is this?', A(['tennis'] * 1 + ['baseball'] * 9), 'tennis', 'one match -> 30')
    add('what sport is', 'other', 'What sport is being played?', A(['tennis'] * 3 + ['baseball'] * 7), 'tennis', 'three matches -> 90')
    add('what', 'other', 'What kind of drink?', A(['café'] * 5 + ['cafe'] * 5), 'Café', 'Unicode lower-casing')
    add('why', 'other', 'Why is the man smiling?', A(['happy'] * 4 + ['he is happy'] * 3 + ['joke'] * 3), 'Happy :)', "':' and ')' handled")
    add('what', 'other', 'What time is it?', A(['10:30'] * 5 + ['10:30 am'] * 5), '10:30', 'colon is not in the punctuation list')
    # duplicated answer dicts (a data error): leave-one-out removes *every* dict equal to the held-out one
    dup = A(['cat'] * 5 + ['kitten'] * 5)
    dup[1] = dict(dup[0])
    add('what animal is', 'other', 'What animal is on the couch?', dup, 'cat', 'QUIRK: answer dicts compared as whole dicts')
    # ---- a 32-question group with all-or-nothing accuracies: 21/32 -> 65.625 is an exact binary tie ----
    colors = ['red', 'blue', 'green', 'white', 'black', 'yellow', 'brown', 'orange']
    for k in range(32):
        col = colors[k % 8]
        if k < 21:
            if k % 3 == 0:
                ans, pred, note = A([col] * 10), col, 'tie group: exact'
            elif k % 3 == 1:
                ans, pred, note = A([col] * 6 + ['dark ' + col] * 4), col.upper() + '.', 'tie group: normalised (>= 4 matches -> 1.0)'
            else:
                ans, pred, note = A([col] * 5 + [col + ' and white'] * 5), ' ' + col, 'tie group: stripped'
        else:
            if k % 2 == 0:
                ans, pred, note = A([col] * 10), col.capitalize(), 'tie group: QUIRK capitalised vs identical GT -> 0'
            else:
                ans, pred, note = A([col] * 6 + ['gray'] * 4), 'purple', 'tie group: wrong'
        add('what color is the', 'other', 'What color is the object %d?' % k, ans, pred, note)
    return c


def vqa_write_inputs(out):
    cases = vqa_cases()
    anns, ques, preds = [], [], []
    for k, (qt, at, q, answers, pred, note) in enumerate(cases):
        qid = 458752000 + k * 7
        img = 458752 + k // 3
        mc = max(set(a['answer'] for a in answers), key=[a['answer'] for a in answers].count)
        anns.append({'question_id': qid, 'image_id': img, 'question_type': qt, 'answer_type': at,
                     'multiple_choice_answer': mc, 'answers': answers})
        ques.append({'question_id': qid, 'image_id': img, 'question': q})
        preds.append({'question_id': qid, 'answer': pred, '_case': note})
    # the official loader ignores unknown keys; keep the case notes in the predictions file
    meta = {'description': 'memvp scoring fixture (synthetic)', 'version': '1.0', 'year': 2024}
    annotations = {'info': meta, 'license': {'name': 'CC-BY 4.0'}, 'data_type': 'mscoco',
                   'data_subtype': 'val2014', 'annotations': anns}
    questions = {'info': meta, 'task_type': 'Open-Ended', 'data_type': 'mscoco', 'data_subtype': 'val2014',
                 'license': {'name': 'CC-BY 4.0'}, 'questions': ques}
    dump(os.path.join(out, 'vqa_annotations.json'), annotations)
    dump(os.path.join(out, 'vqa_questions.json'), questions)
    dump(os.path.join(out, 'vqa_predictions.json'), preds)
    return annotations, questions, preds


def vqa_run_official(tools_dir, ann_path, ques_path, pred_path, rounding=round):
    extra = {'round': rounding} if rounding is not round else None
    vqa_mod = load_module('vqa', os.path.join(tools_dir, 'vqa.py'))
    eval_mod = load_module('vqaEval', os.path.join(tools_dir, 'vqaEval.py'), extra)
    vqa = vqa_mod.VQA(ann_path, ques_path)
    vqa_res = vqa.loadRes(pred_path, ques_path)
    ev = eval_mod.VQAEval(vqa, vqa_res, n=2)
    ev.evaluate()
    print()
    return ev


def vqa_variant(tools_dir, annotations, preds, mode):
    """Non-official variants, only used to show that the fixture discriminates them."""
    eval_mod = load_module('vqaEval_variant', os.path.join(tools_dir, 'vqaEval.py'))
    ev = eval_mod.VQAEval.__new__(eval_mod.VQAEval)
    eval_mod.VQAEval.__init__(ev, types.SimpleNamespace(getQuesIds=lambda: []), None)
    res = {p['question_id']: p['answer'] for p in preds}
    accs = []
    for ann in copy.deepcopy(annotations['annotations']):
        gts = [a['answer'].replace('\n', ' ').replace('\t', ' ').strip() for a in ann['answers']]
        r = res[ann['question_id']].replace('\n', ' ').replace('\t', ' ').strip()
        if mode == 'always_normalise':  # naive: ignore the "all ten identical" quirk
            gts = [ev.processDigitArticle(ev.processPunctuation(a)) for a in gts]
            r = ev.processDigitArticle(ev.processPunctuation(r))
        elif mode == 'old_vqaEval_c4e6a0e':  # older, widely copied version of vqaEval.py
            r = ev.processDigitArticle(ev.processPunctuation(r))
            if len(set(gts)) > 1:
                gts = [ev.processPunctuation(a) for a in gts]
        accs.append(sum(min(1, float(sum(1 for j, g in enumerate(gts) if j != i and g == r)) / 3)
                        for i in range(len(gts))) / len(gts))
    return round(100 * float(sum(accs)) / len(accs), 2)


def do_vqa(out, tools_dir):
    annotations, questions, preds = vqa_write_inputs(out)
    paths = [os.path.join(out, n) for n in ('vqa_annotations.json', 'vqa_questions.json', 'vqa_predictions.json')]
    ev = vqa_run_official(tools_dir, *paths)
    ev2 = vqa_run_official(tools_dir, *paths, rounding=py2_round)
    expected = {
        'overall': ev.accuracy['overall'],
        'perAnswerType': ev.accuracy['perAnswerType'],
        'perQuestionType': ev.accuracy['perQuestionType'],
        'perQuestion': {str(k): v for k, v in ev.evalQA.items()},
        '_provenance': 'GT-Vision-Lab/VQA vqaEval.py@a013f004 + vqa.py@5e7e7dfb, Python 3 port (scripts/scoring_reference.py)',
        '_variants': {
            'python2_round': {'overall': ev2.accuracy['overall'],
                              'perQuestionType': ev2.accuracy['perQuestionType'],
                              'perAnswerType': ev2.accuracy['perAnswerType']},
            'always_normalise_overall': vqa_variant(tools_dir, annotations, preds, 'always_normalise'),
            'old_vqaEval_c4e6a0e_overall': vqa_variant(tools_dir, annotations, preds, 'old_vqaEval_c4e6a0e'),
        },
    }
    dump(os.path.join(out, 'vqa.expected.json'), expected)
    print('VQA', json.dumps({k: expected[k] for k in ('overall', 'perAnswerType', '_variants')}, indent=1))


# =============================================================================================
# Captions (pycocoevalcap)
# =============================================================================================

CAPTION_IMAGES = [
    (391895, ['A man with a red helmet on a small moped on a dirt road. ',
              'Man riding a motor bike on a dirt road on the countryside.',
              'A man riding on the back of a motorcycle.',
              'A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a bridge and a background of cloud-wreathed mountains. ',
              'A man in a red shirt and a red hat is on a motorcycle on a hill side.']),
    (522418, ['A woman wearing a net on her head cutting a cake. ',
              'A woman cutting a large white sheet cake.',
              'A woman wearing a hair net cutting a large sheet cake.',
              'there is a woman that is cutting a white cake',
              "A woman marking a cake with the back of a chef's knife. "]),
    (184613, ['A child holding a flowered umbrella and petting a yak.',
              'A young man holding an umbrella next to a herd of cattle.',
              'a young boy barefoot holding an umbrella touching the horn of a cow',
              'A young boy with an umbrella who is touching the horn of a cow.',
              'A boy holding an umbrella while standing next to livestock.']),
    (318219, ['A young boy standing in front of a computer keyboard.',
              'a little boy wearing headphones and looking at a computer monitor',
              'He is listening intently to the computer at school.',
              'A young boy stares up at the computer monitor.',
              'a young kid with head phones on using a computer ']),
    (554625, ['a boy wearing headphones using one computer in a long row of computers',
              'A little boy with earphones on listening to something.',
              'A group of people sitting at desk using computers.',
              'Children sitting at computer stations on a long table.',
              'A small child wearing headphones plays on the computer.']),
    (397133, ['A man is in a kitchen making pizzas.',
              'Man in apron standing on front of oven with pans and bakeware',
              'A baker is working in the kitchen rolling dough.',
              'A person standing by a stove in a kitchen.',
              'A table with pies being made and a person standing near a wall with pots and pans hanging on the wall.']),
    (37777, ['The dining table near the kitchen has a bowl of fruit on it.',
             'A small kitchen has various appliances and a table.',
             'The kitchen is clean and ready for us to see.',
             'A kitchen and dining area decorated in white.',
             'A kitchen that has a bowl of fruit on the table.']),
    (252219, ['a person with a shopping cart on a city street ',
              'City dwellers walk by as a homeless man begs for cash.',
              'People walking past a homeless man begging on a city street',
              'a homeless man holding a cup and standing next to a shopping cart on a street',
              'People are walking on the street by a homeless person.']),
    (87038, ['A person on a skateboard and bike at a skate park.',
             'A man on a skateboard performs a trick at the skate park',
             'A skateboarder jumps into the air as he performs a skateboard trick.',
             'Athletes performing tricks on a BMX bicycle and a skateboard.',
             'a man falls off his skateboard in a skate park.']),
    (174482, ["A blue bike parked on a side walk. ",
              "A bicycle is chained to a fixture on a city street",
              "A blue bicycle sits on a sidewalk near a street.",
              "A bicycle is locked up to a post",
              "a bike sits parked next to a street "]),
    (403385, ['A bathroom with a toilet, sink, and shower.',
              'A clean bathroom (with a toilet) and a sink -- very white.',
              "A bathroom that's white, with a toilet & a tub/shower combo.",
              'Bathroom with a "modern" look; toilet, sink, shower etc.',
              'The U.S. style bathroom has 2 sinks and 1,000 tiles...']),
    (6818, ['Two people are on a 10-foot surfboard in the ocean!',
            "It's a dog's life: a dog rides a surfboard.",
            'A dog and a man surfing on a 3.5 m wave at 10:30 a.m.',
            'a man and his dog riding the same surfboard',
            'A MAN AND A DOG SURF TOGETHER ON A BOARD.']),
    (480985, ['A café with tables, chairs & umbrellas outside.',
              'People eat at a sidewalk café in Zürich.',
              'Tables and umbrellas in front of a restaurant ("Chez Marie").',
              'An outdoor seating area of a restaurant with umbrellas.',
              'Several tables with white umbrellas on a street.']),
    (74, ['A picture of a dog laying on the ground.',
          'Dog snoozing by a bike on the edge of a cobblestone street',
          'The white dog lays next to the bicycle on the sidewalk.',
          'a white dog is sleeping on a street and a bicycle',
          'A puppy rests on the street next to a bicycle.']),
    (999999, ['An image that has references but no prediction (not evaluated).',
              'A second reference.', 'A third reference.', 'A fourth reference.', 'A fifth reference.']),
]

# predictions, deliberately NOT in GT image order (evaluation order follows the GT images list)
CAPTION_PREDS = [
    (6818, "it's a man and his dog -- surfing on a surfboard!!"),
    (391895, 'A man riding a motorcycle on a dirt road.'),
    (522418, 'a woman cutting a large white sheet cake'),
    (184613, 'A boy holding an umbrella next to a cow.'),
    (318219, 'a a a a a boy boy boy computer computer'),
    (554625, ''),
    (397133, '!!! ... ??? ;;; --- (((   )))'),
    (37777, "The kitchen's table has a bowl of fruit (apples, etc.) on it."),
    (252219, 'A homeless man with a shopping cart on a city street, isn\'t he?'),
    (87038, 'A skateboarder does a trick at the skate park in the U.S. The crowd cheers.'),
    (174482, 'A BLUE BICYCLE PARKED ON THE SIDEWALK NEXT TO A STREET.'),
    (403385, 'A bathroom with 2 sinks, a toilet and 1,000 tiles; it\'s 3.5 m wide.'),
    (480985, 'People sitting at tables under umbrellas at a café.'),
    (74, 'a dog that is laying down next to a bike on the street and also a dog that is laying down next to a bike on the street'),
]


def captions_write_inputs(out):
    gt = {'info': {'description': 'memvp scoring fixture (synthetic captions in COCO format)'},
          'images': [], 'annotations': [], 'licenses': [], 'type': 'captions'}
    ann_id = 1
    for img, caps in CAPTION_IMAGES:
        gt['images'].append({'id': img, 'file_name': 'COCO_val2014_%012d.jpg' % img, 'height': 480, 'width': 640})
        for cap in caps:
            gt['annotations'].append({'image_id': img, 'id': ann_id, 'caption': cap})
            ann_id += 1
    preds = [{'image_id': i, 'caption': c} for i, c in CAPTION_PREDS]
    dump(os.path.join(out, 'captions_gt.json'), gt)
    dump(os.path.join(out, 'captions_predictions.json'), preds)


def captions_run_official(out):
    from pycocotools.coco import COCO
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    coco = COCO(os.path.join(out, 'captions_gt.json'))
    coco_res = coco.loadRes(os.path.join(out, 'captions_predictions.json'))
    # == COCOEvalCap(coco, coco_res) with params['image_id'] = coco_res.getImgIds() and the
    # scorer list of COCOEvalCap.evaluate minus SPICE (needs CoreNLP models, not shipped).
    img_ids = coco_res.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in img_ids}
    res = {i: coco_res.imgToAnns[i] for i in img_ids}
    tok = PTBTokenizer()
    gts_t = tok.tokenize(gts)
    res_t = tok.tokenize(res)
    result, per_image, doc_only = {}, {str(i): {} for i in img_ids}, {}
    for scorer, names in [(Bleu(4), ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4']), (Rouge(), ['ROUGE_L']), (Cider(), ['CIDEr'])]:
        score, scores = scorer.compute_score(gts_t, res_t) if not isinstance(scorer, Bleu) \
            else scorer.compute_score(gts_t, res_t, verbose=0)
        if len(names) == 1:
            score, scores = [score], [scores]
        for n, s, ss in zip(names, score, scores):
            result[n] = float(s)
            for i, v in zip(gts_t.keys(), ss):
                per_image[str(i)][n] = float(v)
    try:
        m = Meteor()
        ms, _ = m.compute_score(gts_t, res_t)
        doc_only['METEOR'] = float(ms)
    except Exception as e:  # documentation only
        doc_only['METEOR'] = 'failed: %r' % (e,)
    # variant without PTB tokenisation (lower-case + whitespace split), to show it matters
    raw_g = {i: [' '.join(a['caption'].lower().split()) for a in gts[i]] for i in img_ids}
    raw_r = {i: [' '.join(a['caption'].lower().split()) for a in res[i]] for i in img_ids}
    no_ptb = {}
    for scorer, names in [(Bleu(4), ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4']), (Rouge(), ['ROUGE_L']), (Cider(), ['CIDEr'])]:
        score, _ = scorer.compute_score(raw_g, raw_r) if not isinstance(scorer, Bleu) \
            else scorer.compute_score(raw_g, raw_r, verbose=0)
        for n, s in zip(names, score if len(names) > 1 else [score]):
            no_ptb[n] = float(s)
    expected = dict(result)
    expected['num_images'] = len(img_ids)
    expected['image_order'] = list(img_ids)
    expected['per_image'] = per_image
    expected['tokenized'] = {'gts': {str(k): v for k, v in gts_t.items()}, 'res': {str(k): v for k, v in res_t.items()}}
    expected['_documentation_only'] = doc_only
    expected['_variants'] = {'without_ptb_tokenizer': no_ptb}
    expected['_provenance'] = 'pycocoevalcap 1.2 (PTBTokenizer: stanford-corenlp-3.4.1.jar), pycocotools COCO.loadRes'
    dump(os.path.join(out, 'captions.expected.json'), expected)
    print('CAPTIONS', json.dumps({k: expected[k] for k in result}, indent=1), doc_only)


# =============================================================================================
# PTB tokenizer sentences (raw Java output lines and pycocoevalcap's final tokens)
# =============================================================================================

PTB_SENTENCES = [
    # realistic captions
    "A man riding a wave on top of a surfboard.", "Two dogs playing in the grass, one with a frisbee!",
    "The 3-year-old's birthday cake (chocolate).", "It's a man's world...", "red, white, and blue",
    "A woman's umbrella is red and white .", "A ZEBRA STANDING IN A FIELD", "a dog   in a  field",
    "  leading spaces", "trailing spaces   ", "", "a man (wearing a hat) walks", "there are 2 dogs,3 cats and 1,000 birds",
    # contractions and possessives
    "A man don't like the dog's bone.", "I can't won't shouldn't y'all gonna wanna gotta cannot",
    "he's she'd we'll they're i'm you've i'd", "don't DON'T Don't isn't aren't can't", "it’s a dog’s life don’t",
    "the dog 's bone the dog' s bone the dog s' bone", "dogs' bones and the dogs ' bones", "o'clock O'Neil ma'am rock 'n' roll 'tis 'twas",
    "the '80s and 80's and '80 and the 1980's", "y'know ya'll wouldn't've can'tve",
    # quotes
    'He said "hello" to the (big) dog.', "'single quoted' `backtick' ''double''", '"Hello," she said. "Yes" \'no\' "5" "$5"',
    'a "quote" b " space " c', "“Quoted” text and ‘single’ ones", "« guillemets » too",
    # hyphens, dashes, ellipses
    "a t-shirt and x-ray 3-year-old well-known", "A well-known man--the best--ran.", "a--b a---b a----b a-----b",
    "a dash – and — em", "hmm... and .... and . . . and …", "wow!!! what?! ok?!?", "under_score and a__b",
    # numbers
    "10:30 am 1,000,000 3.14159 .5 5. 1.2.3", "-5 degrees +5 and 5-6 and 5 - 6", "1990s '90s 5th 2nd 21st",
    "1/2 3/4 1 1/2 ½ ¼ 5/10/2020", "$5 $ 5 5$ US$5 £5 €5 ¥5 ¢5", "123-456-7890 (123) 456-7890", "50% off and 5 & 6",
    "a 3.5\" floppy disk", "a :30 b 5:30 ,5 5,5 5. 5.. 12.5.6",
    # abbreviations and acronyms (some depend on the next line!)
    "Ms. Smith and Dr. Jones at 3 p.m. in the U.S.", "I saw Mr. Smith. He is at St. Mary's.", "It is 3 p.m.",
    "Mr. Smith is here.", "a man etc. and more", "a man etc.", "people etc. Then", "he got an A.", "a sign that says a.",
    "The U.S. flag.", "x U.S. He", "x U.S.", "He went", "x etc.", "The", "x etc.", "the", "no. 5 No. 5 fig. 3 ca. 1990 vs. Vs. vs",
    "Jan. 5 jan. 5 Inc. Corp. Co. Ltd. Jr. Sr.", "a.m. p.m. A.M. P.M. U.S.A. U.K. e.g", "hello.world wow!amazing yahoo! e.g. i.e. etc.,",
    # brackets, symbols, markup
    "{braces} [brackets] <angle> & amp &amp; @ # % ^ ~ + = |", "<b c> a<b and c>d <b", "* stars ** and ***",
    "a/b and/or him/her", "semi;colon colon: comma,comma", "email@example.com www.example.com http://example.com/path?x=1",
    "#hashtag @user #1 #tag_1", ":) ;) :-) :( =) :D :P ;@", "see photo.jpg and 1.png here", "C++ and C# code",
    # unicode
    "Café naïve résumé 日本 emoji 😀 end.", "a ♥ and a ★ and a ✓", "Zürich, São Paulo and Москва", "tab\there and nbsp\u00a0here",
    "zero\u200bwidth", "soft\u00adhyphen", "cp1252 \x93quotes\x94 and \x96 dash",
    # line-break characters inside a caption shift the following lines (pycocoevalcap only replaces \n)
    "a caption with a carriage return\rinside", "next caption", "form\x0cfeed", "last caption",
]


# plus deterministic "token soup" lines mixing the fragments above (broad coverage of the
# lexer's rules and of their interactions across caption boundaries)
SOUP_FRAGMENTS = (
    "man woman dog cat bus pizza giraffe t-shirt x-ray 3-year-old well-known half-eaten sitting standing "
    "is are 's 're isn't don't can't cannot gonna wanna on in at with next to of . , ; : ! ? ... .... - -- --- "
    "( ) [ ] { } \" ' ` '' `` & &amp; / * ** # @ % $ + = < > | ~ ^ _ Mr. Mrs. Dr. St. st. etc. etc U.S. U.S "
    "U.K. a.m. p.m. No. no. fig. vs. Inc. Co. Jr. A. a. I. x. e.g. i.e. The He She It They A An In This That "
    "There You We But So One Now Then dog's dogs' o'clock O'Neil rock'n'roll 'em '90s 80's y'all ma'am I'm "
    "you're 1 2 10 2.5 3.14 1,000 10:30 1/2 3/4 1-2 -5 +5 1990s 1st 2nd 12/25/2020 555-1234 (555) 123-4567 "
    "$5 US$ £ € ¥ ¢ 50% #1 #tag @user x@y.com www.site.com http://a.b/c site.com photo.jpg C++ :) ;-) "
    "café naïve Zürich 東京 — – … “ ” ‘ ’ « » ½ ° © ™ × ♥ ★ 😀"
).split(' ')


def soup_sentences(n, seed=20240521):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        words = []
        for _ in range(k):
            w = rng.choice(SOUP_FRAGMENTS)
            r = rng.random()
            w = w.upper() if r < 0.07 else (w.capitalize() if r < 0.2 else w)
            words.append(w)
        seps = [rng.choice([' ', ' ', ' ', '', '  ']) for _ in range(k - 1)]
        out.append(''.join(w + sp for w, sp in zip(words, seps + [''])) + rng.choice(['', '', '.', ' .', '?', '!']))
    return out


PTB_SENTENCES = PTB_SENTENCES + soup_sentences(300)


def ptb_java_raw(sentences):
    import pycocoevalcap
    jar_dir = os.path.join(list(pycocoevalcap.__path__)[0], 'tokenizer')
    data = '\n'.join(s.replace('\n', ' ') for s in sentences)
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, 'wb') as f:
        f.write(data.encode())
    try:
        out = subprocess.run(['java', '-cp', os.path.join(jar_dir, 'stanford-corenlp-3.4.1.jar'),
                              'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines', '-lowerCase', path],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    finally:
        os.remove(path)
    return out.stdout.decode().split('\n')


def do_ptb(out):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    raw = ptb_java_raw(PTB_SENTENCES)
    # pycocoevalcap's own wrapper on the same list (one "image" per sentence, in order)
    caps = {k: [{'caption': s}] for k, s in enumerate(PTB_SENTENCES)}
    final = PTBTokenizer().tokenize(caps)
    dump(os.path.join(out, 'ptb_java.json'), {
        '_provenance': 'stanford-corenlp-3.4.1.jar (pycocoevalcap 1.2) PTBTokenizer -preserveLines -lowerCase',
        'sentences': PTB_SENTENCES,
        'java_output_lines': raw,
        'pycocoevalcap_tokenized': [final[k][0] if k in final else None for k in range(len(PTB_SENTENCES))],
    })
    print('PTB', len(PTB_SENTENCES), 'sentences,', len(raw), 'output lines')


# =============================================================================================
# GQA
# =============================================================================================

def gqa_cases():
    """(qid, question, answer, structural, semantic, detailed, balanced, prediction(s), note)."""
    Q = []
    add = lambda *a: Q.append(a)
    add('20968379', 'Is the sky blue or white?', 'blue', 'choose', 'attr', 'chooseAttr', True, ['blue'], 'correct')
    add('201640614', 'Who is wearing the shirt?', 'man', 'query', 'rel', 'relS', True, ['man'], 'correct')
    add('20807826', 'Is the person wearing a helmet?', 'yes', 'verify', 'rel', 'verifyRelS', True, ['Yes'], 'case differs -> wrong')
    add('20807827', 'Is the fence made of wood?', 'no', 'verify', 'attr', 'verifyAttr', True, [' no'], 'leading space -> wrong')
    add('201307251', 'What is the color of the bus?', 'white', 'query', 'attr', 'queryAttr', True, ['white.'], 'period -> wrong')
    add('202225914', 'Are there both cars and buses?', 'yes', 'logical', 'obj', 'existAndC', True, ['yes'], 'correct')
    add('20538745', 'Is there either a cat or a dog?', 'no', 'logical', 'obj', 'existOrC', True, ['yes'], 'wrong')
    add('2076589', 'Do the shirt and the pants have the same color?', 'no', 'compare', 'attr', 'sameRelate', True, ['no'], 'correct')
    add('20196004', 'Which is taller, the man or the woman?', 'man', 'compare', 'attr', 'compare', True, ['the man'], 'extra article -> wrong')
    add('202232584', 'What place is this?', 'beach', 'query', 'global', 'place', True, ['beach'], 'correct')
    add('20224659', 'Which room is it?', 'kitchen', 'query', 'global', 'room', True, ['living room'], 'wrong')
    add('201888896', 'What kind of furniture is it?', 'table', 'query', 'cat', 'categoryRelS', True, ['table'], 'correct')
    add('20604587', 'Which kind of animal is it?', 'dog', 'query', 'cat', 'category', True, ['cat', 'dog'], 'duplicate prediction: last wins -> correct')
    add('201079939', 'Is the table to the left or to the right of the chair?', 'left', 'choose', 'rel', 'chooseRel', True, ['right'], 'wrong')
    add('20393966', 'What is the man holding?', 'umbrella', 'query', 'rel', 'relO', True, ['umbrella'], 'correct')
    add('20393967', 'Is the umbrella open?', 'yes', 'verify', 'attr', 'verifyAttr', True, ['yes'], 'correct')
    add('20393968', 'Are the cup and the plate made of the same material?', 'yes', 'compare', 'attr', 'sameMaterialC', True, ['yes '], 'trailing space -> wrong')
    add('20393969', 'Is there a bottle on the table?', 'no', 'verify', 'rel', 'existRelS', True, ['no'], 'correct')
    add('20393970', 'What color is the car?', 'red', 'query', 'attr', 'queryAttr', True, ['Red'], 'case -> wrong')
    add('20393971', 'Is the lamp on the left side?', 'yes', 'verify', 'attr', 'positionVerify', True, ['yes'], 'correct')
    add('20393972', 'Which color is the shirt, blue or green?', 'green', 'choose', 'attr', 'chooseAttr', True, ['green'], 'correct')
    add('20393973', 'Is the woman standing or sitting?', 'sitting', 'choose', 'attr', 'chooseAttr', True, ['standing'], 'wrong')
    add('20393974', 'Are both the bag and the shoe black?', 'no', 'logical', 'attr', 'twoSame', True, ['no'], 'correct')
    add('20393975', 'Who is in front of the building?', 'person', 'query', 'rel', 'relS', True, ['people'], 'wrong')
    add('20393976', 'What is on the plate?', 'pizza', 'query', 'rel', 'relS', False, [], 'unbalanced, no prediction: skipped')
    add('20393977', 'Is it indoors or outdoors?', 'outdoors', 'choose', 'global', 'locationChoose', False, ['indoors'], 'unbalanced: skipped')
    return Q


def do_gqa(out, gqa_eval):
    questions, preds = {}, []
    for k, (qid, q, a, st, se, de, bal, ps, note) in enumerate(gqa_cases()):
        questions[qid] = {
            'semantic': [{'operation': 'select', 'dependencies': [], 'argument': 'object (%d)' % (1000 + k)},
                         {'operation': 'query' if st == 'query' else st, 'dependencies': [0], 'argument': 'name'}],
            'entailed': [], 'equivalent': [qid], 'question': q, 'imageId': 'n%06d' % (160000 + k),
            'isBalanced': bal, 'groups': {'global': (a if st == 'query' else None), 'local': '10q-%s' % de},
            'answer': a, 'semanticStr': 'select: object -> %s' % st,
            'annotations': {'answer': {}, 'question': {}, 'fullAnswer': {}},
            'types': {'detailed': de, 'semantic': se, 'structural': st},
            'fullAnswer': 'The answer is %s.' % a, '_case': note,
        }
        for p in ps:
            preds.append({'questionId': qid, 'prediction': p})
    preds.append({'questionId': '99999999', 'prediction': 'yes'})  # unknown id: ignored
    qpath = os.path.join(out, 'gqa_questions.json')
    ppath = os.path.join(out, 'gqa_predictions.json')
    dump(qpath, questions)
    dump(ppath, preds)
    gqa_eval, qpath, ppath = os.path.abspath(gqa_eval), os.path.abspath(qpath), os.path.abspath(ppath)
    old_argv, old_cwd = sys.argv, os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:  # no scene graphs / choices there
        os.chdir(tmp)
        try:
            sys.argv = ['eval.py', '--tier', 'testdev', '--questions', qpath, '--predictions', ppath]
            g = runpy.run_path(gqa_eval, run_name='__main__')
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
    s = g['scores']
    expected = {
        'accuracy': s['accuracy'], 'binary': s['binary'], 'open': s['open'],
        'accuracyPerStructuralType': {k: v[0] for k, v in s['accuracyPerStructuralType'].items()},
        'accuracyPerSemanticType': {k: v[0] for k, v in s['accuracyPerSemanticType'].items()},
        'questionsPerStructuralType': {k: v[1] for k, v in s['accuracyPerStructuralType'].items()},
        'questionsPerSemanticType': {k: v[1] for k, v in s['accuracyPerSemanticType'].items()},
        '_documentation_only': {'distribution': s['distribution'], 'validity': s['validity'], 'plausibility': s['plausibility']},
        '_provenance': 'official GQA eval.py (v1.2 evaluation package), run unmodified via runpy',
    }
    dump(os.path.join(out, 'gqa.expected.json'), expected)
    print('GQA', json.dumps(expected, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out-dir', default=DEFAULT_OUT)
    ap.add_argument('--vqa-tools', required=True, help='directory with the official (Python 2) vqaEval.py and vqa.py')
    ap.add_argument('--gqa-eval', required=True, help='path of the official GQA eval.py')
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    do_vqa(args.out_dir, args.vqa_tools)
    captions_write_inputs(args.out_dir)
    captions_run_official(args.out_dir)
    do_ptb(args.out_dir)
    do_gqa(args.out_dir, args.gqa_eval)


if __name__ == '__main__':
    main()
