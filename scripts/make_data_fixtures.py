"""Writes the tiny data-set fixtures of tests/data_encdec.rs in the official layouts:

    tests/fixtures/vqav2/   VQA v2 (questions, annotations, COCO-named images)
    tests/fixtures/gqa/     GQA balanced questions + images/
    tests/fixtures/coco/    Karpathy dataset_coco.json, images, official annotations/captions_val2014.json

Every file is hand-designed (no real data); the images are 8x8 solid-colour JPEGs. The expected
numbers are computed by hand in tests/data_encdec.rs. Deterministic; run from the repository root:

    /work/venv/bin/python scripts/make_data_fixtures.py
"""

import json
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def jpg(path: Path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path, "JPEG", quality=75)


def dump(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def answers(*pairs):
    """answers(("yes", 3), ("no", 7)) -> ten official answer dicts, in the given order."""
    out = []
    for a, n in pairs:
        for _ in range(n):
            out.append({"answer": a, "answer_confidence": "yes", "answer_id": len(out) + 1})
    assert len(out) == 10, out
    return out


def vqav2():
    d = ROOT / "vqav2"
    shutil.rmtree(d, ignore_errors=True)
    info = {"description": "memvp data fixture (hand-made)", "version": "2.0"}
    # val2014: five questions on three images; see tests/data_encdec.rs for the hand scores
    vq = [
        (42000, 42, "Is the man happy?", "is the", "yes/no", [("yes", 10)], "yes"),
        (42001, 42, "What color is the bus?", "what color is the", "other",
         [("red", 1), ("blue", 4), ("red", 1), ("dark red", 1), ("blue", 3)], "blue"),
        (73000, 73, "How many dogs are there?", "how many", "number",
         [("2", 2), ("two", 1), ("3", 7)], "3"),
        (73001, 73, "What is on the table?", "what is on the", "other",
         [("cake", 6), ("pie", 4)], "cake"),
        # a 4-4-2 tie: first occurrence ("dog") wins; the file's multiple_choice_answer says
        # "cat" on purpose, to show that the target comes from the ten answers
        (74000, 74, "What animal is this?", "what animal is", "other",
         [("dog", 1), ("cat", 1), ("dog", 1), ("cat", 1), ("kitten", 2), ("dog", 2), ("cat", 2)],
         "cat"),
    ]
    flat = []
    for qid, img, q, qt, at, ans, mc in vq:
        a = []
        for s, n in ans:
            a += [s] * n
        flat.append((qid, img, q, qt, at, a, mc))
    dump(d / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
        "questions": [{"image_id": img, "question": q, "question_id": qid}
                      for qid, img, q, *_ in flat],
    })
    dump(d / "v2_mscoco_val2014_annotations.json", {
        "info": info, "data_type": "mscoco", "data_subtype": "val2014",
        "annotations": [{
            "question_type": qt, "multiple_choice_answer": mc,
            "answers": [{"answer": s, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, s in enumerate(a)],
            "image_id": img, "answer_type": at, "question_id": qid,
        } for qid, img, q, qt, at, a, mc in flat],
    })
    for img, rgb in [(42, (200, 30, 30)), (73, (30, 200, 30)), (74, (30, 30, 200))]:
        jpg(d / "val2014" / f"COCO_val2014_{img:012}.jpg", rgb)
    # train2014: one question
    dump(d / "v2_OpenEnded_mscoco_train2014_questions.json", {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014",
        "questions": [{"image_id": 9, "question": "What is the cat doing?", "question_id": 9000}],
    })
    dump(d / "v2_mscoco_train2014_annotations.json", {
        "info": info, "data_type": "mscoco", "data_subtype": "train2014",
        "annotations": [{
            "question_type": "what is the", "multiple_choice_answer": "sleeping",
            "answers": answers(("sleeping", 8), ("resting", 2)),
            "image_id": 9, "answer_type": "other", "question_id": 9000,
        }],
    })
    jpg(d / "train2014" / "COCO_train2014_000000000009.jpg", (120, 120, 120))
    # test2015 and test-dev2015: questions only (no annotations), images in test2015/
    dump(d / "v2_OpenEnded_mscoco_test2015_questions.json", {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "test2015",
        "questions": [
            {"image_id": 1, "question": "Is it sunny?", "question_id": 1000},
            {"image_id": 1, "question": "What sport is this?", "question_id": 1001},
        ],
    })
    dump(d / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco",
        "data_subtype": "test-dev2015",
        "questions": [{"image_id": 1, "question": "Is it sunny?", "question_id": 1000}],
    })
    jpg(d / "test2015" / "COCO_test2015_000000000001.jpg", (250, 250, 0))


def gqa():
    d = ROOT / "gqa"
    shutil.rmtree(d, ignore_errors=True)

    def q(image, question, answer, structural, semantic, detailed, balanced=True):
        return {
            "semantic": [{"operation": "select", "dependencies": [], "argument": "x (1)"}],
            "entailed": [], "equivalent": [], "question": question, "imageId": image,
            "isBalanced": balanced, "groups": {"global": None, "local": "x"},
            "answer": answer, "semanticStr": "select: x", "annotations": {},
            "types": {"detailed": detailed, "semantic": semantic, "structural": structural},
            "fullAnswer": f"The answer is {answer}.",
        }

    # file order deliberately not sorted by id
    dump(d / "testdev_balanced_questions.json", {
        "20201": q("n100", "Is the sky blue?", "yes", "verify", "attr", "verifyAttr"),
        "20105": q("n100", "What color is the car?", "red", "query", "attr", "queryAttr"),
        "20302": q("2354786", "Is the cup to the left or right of the plate?", "left",
                   "choose", "rel", "chooseRel"),
        "20003": q("2354786", "Are there both cups and plates?", "no", "logical", "obj",
                   "logicalObj"),
        "20404": q("n100", "What animal is it?", "dog", "query", "cat", "categoryThis",
                   balanced=False),
    })
    dump(d / "train_balanced_questions.json", {
        "9001": q("n100", "Which color is the car?", "red", "query", "attr", "queryAttr"),
        "9002": q("2354786", "Is there a cup?", "yes", "verify", "obj", "existC"),
    })
    # the public test file has no answers or types
    dump(d / "test_balanced_questions.json", {
        "t1": {"question": "Is the car red?", "imageId": "n100", "isBalanced": True},
    })
    jpg(d / "images" / "n100.jpg", (10, 10, 240))
    jpg(d / "images" / "2354786.jpg", (240, 10, 10))


def coco():
    d = ROOT / "coco"
    shutil.rmtree(d, ignore_errors=True)

    def img(folder, cocoid, split, sents):
        return {
            "filepath": folder, "sentids": list(range(len(sents))),
            "filename": f"COCO_{folder}_{cocoid:012}.jpg", "imgid": cocoid, "split": split,
            "sentences": [{"tokens": s.lower().strip(" .").split(), "raw": s, "imgid": cocoid,
                           "sentid": k} for k, s in enumerate(sents)],
            "cocoid": cocoid,
        }

    images = [
        img("train2014", 9, "train", ["A cat sleeping on a sofa.", "A grey cat asleep "]),
        img("train2014", 25, "train", ["A giraffe eating leaves.", "A tall giraffe by a tree"]),
        img("val2014", 42, "restval", ["A red bus on a street.", "A bus parked by the road"]),
        img("val2014", 73, "val", ["Two dogs playing.", "Dogs in a park", "A pair of dogs"]),
        img("val2014", 74, "test", ["A dog runs on the grass.", "A brown dog running outside"]),
        img("val2014", 133, "test", ["A man riding a horse.", "A person on a horse"]),
    ]
    dump(d / "dataset_coco.json", {"images": images, "dataset": "coco"})
    for i in images:
        shade = (i["cocoid"] * 37) % 256
        jpg(d / i["filepath"] / i["filename"], (shade, 255 - shade, 128))
    # the official captions of the val2014 images: the Karpathy ones plus one more each for
    # 74 and 133, so that scoring against them gives different (hand-computed) numbers
    anns = []
    extra = {74: "a dog on the grass", 133: "A man on a horse."}
    for i in images:
        if i["filepath"] != "val2014":
            continue
        caps = [s["raw"] for s in i["sentences"]] + ([extra[i["cocoid"]]] if i["cocoid"] in extra else [])
        for c in caps:
            anns.append({"image_id": i["cocoid"], "id": 1000 + len(anns), "caption": c})
    dump(d / "annotations" / "captions_val2014.json", {
        "info": {"description": "memvp data fixture (hand-made)"},
        "images": [{"id": i["cocoid"], "file_name": i["filename"], "width": 8, "height": 8}
                   for i in images if i["filepath"] == "val2014"],
        "licenses": [], "type": "captions", "annotations": anns,
    })


if __name__ == "__main__":
    vqav2()
    gqa()
    coco()
    total = sum(p.stat().st_size for n in ("vqav2", "gqa", "coco")
                for p in (ROOT / n).rglob("*") if p.is_file())
    print(f"wrote tests/fixtures/{{vqav2,gqa,coco}} ({total} bytes)")
