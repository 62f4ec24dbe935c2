#!/usr/bin/env python3
"""Reference values for `fila eval`'s benchmark metrics, from a plain-Python restatement of each
official scorer (standard library only; no packages, no downloads).

- VQA accuracy (VQAv2, TextVQA): answers normalised like EvalAI's answer processor (pythia/mmf
  `EvalAIAnswerProcessor`, used by TextVQA's and LLaVA's evaluators), then the mean over the
  reference answers i of min(#{j != i: answer_j == prediction} / 3, 1) (VQA, Antol et al. 2015).
  Our choice for a single reference (no others to agree with): normalised exact match.
- ANLS (DocVQA, InfographicVQA): max over references of 1 - NL if NL < 0.5 else 0, NL = Levenshtein
  distance / longer length, on trimmed, lower-cased, whitespace-collapsed strings (Biten et al.,
  ST-VQA, ICCV 2019).
- Relaxed accuracy (ChartQA): pix2struct's relaxed_correctness, 5 % relative tolerance for numbers
  (a trailing % divides by 100), else case-insensitive equality; 1 if any reference passes.
- Exact match: trimmed, final full stops dropped, lower case; any reference.

Writes, under crates/fila-cli/tests/fixtures/eval/:
  metric_cases.json   hand-made cases with the four expected scores (the Rust unit test reads it)
  benchmark.jsonl     an eval file made of the same cases (new format, one LLaVA record, overrides)
  predictions.jsonl   the cases' predictions, for `fila eval --predictions`
  expected_report.json  the per-metric means `fila eval` must report for that pair

Run:  python3 scripts/eval_metrics_reference.py
"""

import json
import os
import re

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "fila-cli", "tests", "fixtures", "eval")

# ------------------------------------------------------------------------------------------------
# VQA accuracy

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The published table, quirks included: capitalised keys never match lower-cased words, and
# "somebody'd" maps to "somebodyd".
CONTRACTIONS = dict(pair.split(" ") for pair in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
""".replace("\n", "|").strip("|").split("|"))
assert len(CONTRACTIONS) == 120, len(CONTRACTIONS)

# A full stop not followed by a digit. (The original pattern opens with `(?!<=\d)`, a mistyped
# look-behind that, as a look-ahead at a ".", always holds.)
FULL_STOP = re.compile(r"\.(?!\d)")
DIGIT_COMMAS_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def vqa_punctuation(text):
    out = text
    glued = DIGIT_COMMAS_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # The original tests the incoming text, not the partly processed one.
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The original passes re.UNICODE (32) where sub() takes its count: at most 32 full stops go.
    return FULL_STOP.sub("", out, count=32)


def vqa_digits_articles(text):
    words = []
    for word in text.lower().split():
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalise(answer):
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def vqa_accuracy(prediction, answers):
    predicted = vqa_normalise(prediction)
    references = [vqa_normalise(a) for a in answers]
    if len(references) == 1:
        return 1.0 if references[0] == predicted else 0.0
    total = 0.0
    for left_out in range(len(references)):
        matches = sum(1 for j, a in enumerate(references) if j != left_out and a == predicted)
        total += min(matches / 3.0, 1.0)
    return total / len(references)


# ------------------------------------------------------------------------------------------------
# ANLS


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a):
        previous_diagonal, row[0] = row[0], i + 1
        for j, cb in enumerate(b):
            value = min(row[j + 1] + 1, row[j] + 1, previous_diagonal + (ca != cb))
            previous_diagonal, row[j + 1] = row[j + 1], value
    return row[len(b)]


def anls(prediction, answers):
    predicted = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        reference = " ".join(answer.strip().lower().split())
        longest = max(len(predicted), len(reference))
        nl = 0.0 if longest == 0 else levenshtein(predicted, reference) / longest
        best = max(best, 1.0 - nl if nl < 0.5 else 0.0)
    return best


# ------------------------------------------------------------------------------------------------
# Relaxed accuracy


def chart_number(text):
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correct(target, prediction):
    p, t = chart_number(prediction), chart_number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= 0.05
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction, answers):
    return 1.0 if any(relaxed_correct(a, prediction) for a in answers) else 0.0


# ------------------------------------------------------------------------------------------------
# Exact match


def exact_match(prediction, answers):
    norm = lambda s: s.strip().rstrip(".").strip().lower()
    return 1.0 if any(norm(a) == norm(prediction) for a in answers) else 0.0


METRICS = {"vqa_accuracy": vqa_accuracy, "anls": anls, "relaxed_accuracy": relaxed_accuracy, "exact_match": exact_match}

# ------------------------------------------------------------------------------------------------
# Hand-made cases: (group, note, prediction, answers)

TEN = lambda *pairs: [a for a, n in pairs for _ in range(n)]

CASES = [
    # VQA: punctuation, articles, number words, contractions, leave-one-out counts.
    ("vqa", "exclamation mark dropped", "Stop!", TEN(("stop", 10))),
    ("vqa", "articles removed", "The cat", TEN(("cat", 7), ("a cat", 3))),
    ("vqa", "number word to digit", "two", TEN(("2", 4), ("3", 6))),
    ("vqa", "digit against number words", "2", TEN(("two", 2), ("three", 8))),
    ("vqa", "one matching answer", "red", TEN(("red", 1), ("maroon", 9))),
    ("vqa", "three matching answers", "red", TEN(("red", 3), ("maroon", 7))),
    ("vqa", "contraction restored", "dont know", TEN(("don't know", 5), ("no", 5))),
    ("vqa", "contraction with apostrophe kept", "can't", TEN(("cant", 3), ("no", 7))),
    ("vqa", "slash inside a word becomes a space", "black/white", TEN(("black white", 6), ("gray", 4))),
    ("vqa", "spaced slash is deleted", "black / white", TEN(("black white", 6), ("gray", 4))),
    ("vqa", "decimal point kept", "3.5", TEN(("3.5", 2), ("3", 8))),
    ("vqa", "final full stop dropped", "Yes.", TEN(("yes", 9), ("no", 1))),
    ("vqa", "thousands comma removed", "1,000", TEN(("1000", 3), ("one thousand", 7))),
    ("vqa", "possessive split", "man's hat", TEN(("man 's hat", 2), ("hat", 8))),
    ("vqa", "none is zero", "none", TEN(("0", 5), ("zero", 5))),
    ("vqa", "newline and tab", "coca\tcola\n", TEN(("coca cola", 4), ("coke", 6))),
    ("vqa", "hyphen inside a word", "t-shirt", TEN(("t shirt", 3), ("tshirt", 7))),
    ("vqa", "question mark and comma dropped", "Yes, sir?", TEN(("yes sir", 2), ("yes", 8))),
    ("vqa", "capitalised contraction key never matches", "Im", TEN(("i'm", 10))),
    ("vqa", "wrong answer", "blue", TEN(("red", 10))),
    ("vqa", "three references", "dog", ["dog", "dog", "puppy"]),
    ("vqa", "single reference", "A dog.", ["dog"]),
    ("vqa", "parentheses and colon", "(10:30)", TEN(("10:30", 6), ("1030", 4))),
    ("vqa", "many full stops", "a.b.c.d", TEN(("abcd", 5), ("a b c d", 5))),
    # ANLS: near misses around the 0.5 threshold.
    ("anls", "exact up to case and spaces", "  Dr.   Lobo ", ["Dear Dr. Lobo", "dr. lobo"]),
    ("anls", "one character of four wrong", "K7QZ", ["k7oz"]),
    ("anls", "distance exactly half", "ab", ["ac"]),
    ("anls", "just under half", "abcdefg", ["abcdxyz"]),
    ("anls", "just over half", "abc", ["xyz"]),
    ("anls", "best of several references", "12/15/89", ["12/15/88", "December 15, 1988"]),
    ("anls", "empty prediction", "", ["total"]),
    ("anls", "missing word", "Denver Broncos", ["Denver R. Broncos"]),
    ("anls", "non-ASCII characters", "Zürich", ["zurich"]),
    ("anls", "prediction longer than answer", "the answer is 42", ["42"]),
    # Relaxed accuracy: 5 % relative tolerance.
    ("relaxed", "within 5 percent", "104", ["100"]),
    ("relaxed", "exactly 5 percent", "105", ["100"]),
    ("relaxed", "outside 5 percent", "106", ["100"]),
    ("relaxed", "negative numbers", "-19.5", ["-20"]),
    ("relaxed", "percent sign divides by 100", "12%", ["0.12"]),
    ("relaxed", "percent against the bare number", "12%", ["12"]),
    ("relaxed", "zero target compares strings", "0.0", ["0"]),
    ("relaxed", "zero target equal strings", "0", ["0"]),
    ("relaxed", "text answers ignore case", "Yes", ["yes"]),
    ("relaxed", "text answers keep spaces", "yes ", ["yes"]),
    ("relaxed", "thousands separator is not a number", "1,000", ["1000"]),
    ("relaxed", "exponent notation", "1e3", ["1000"]),
    ("relaxed", "surrounding spaces in a number", " 42 ", ["40"]),
    ("relaxed", "any of several references", "7.1", ["Seven", "7"]),
    ("relaxed", "infinity is no closer", "inf", ["100"]),
    # Exact match.
    ("exact", "case and final full stop", "Red.", ["red"]),
    ("exact", "surrounding spaces", "  yes ", ["Yes"]),
    ("exact", "near miss", "K7Q", ["K7O"]),
    ("exact", "second reference", "grey", ["gray", "grey"]),
]

# Records of the fixture eval file that name their own metrics (the rest use `--metric all`).
OVERRIDES = {"distance exactly half": "anls", "within 5 percent": ["relaxed", "exact"]}

IMAGES = ["00_red.png", "01_green.png", "02_blue.png", "03_yellow.png", "04_purple.png", "05_orange.png", "06_white.png", "07_grey.png"]


def metric_names(selection):
    short = {"vqa": "vqa_accuracy", "anls": "anls", "relaxed": "relaxed_accuracy", "exact": "exact_match"}
    if isinstance(selection, str):
        selection = [selection]
    return [short[s] for s in selection]


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for group, note, prediction, answers in CASES:
        cases.append({
            "group": group,
            "note": note,
            "prediction": prediction,
            "answers": answers,
            "vqa_normalised": vqa_normalise(prediction),
            "expected": {name: fn(prediction, answers) for name, fn in METRICS.items()},
        })
    with open(os.path.join(OUT, "metric_cases.json"), "w") as f:
        json.dump({"generated_by": "scripts/eval_metrics_reference.py", "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # The eval file: one record per case (every third without an image), plus a LLaVA record.
    records, predictions = [], []
    for i, case in enumerate(cases):
        record = {"id": f"case-{i:02d}", "question": f"{case['group']} question {i}?", "answers": case["answers"], "qtype": case["group"]}
        if i % 3 != 2:
            record["image"] = IMAGES[i % len(IMAGES)]
        if case["note"] in OVERRIDES:
            record["metric"] = OVERRIDES[case["note"]]
        records.append(record)
        predictions.append({"id": record["id"], "answer": case["prediction"]})
    llava = {"id": "llava-0", "image": "00_red.png", "qtype": "llava",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is the image?"},
                               {"from": "gpt", "value": "Red."},
                               {"from": "human", "value": "Is it wide?"},
                               {"from": "gpt", "value": "Yes."}]}
    records.append(llava)
    predictions.append({"id": "llava-0", "answer": "red"})

    scores = {name: [] for name in METRICS}
    by_type = {}
    answers_of = {r["id"]: (r["answers"] if "answers" in r else [r["conversations"][1]["value"]]) for r in records}
    for record, prediction in zip(records, predictions):
        names = metric_names(record["metric"]) if "metric" in record else list(METRICS)
        for name in names:
            value = METRICS[name](prediction["answer"], answers_of[record["id"]])
            scores[name].append(value)
            by_type.setdefault(record["qtype"], {}).setdefault(name, []).append(value)
    mean = lambda values: {"mean": sum(values) / len(values), "count": len(values)}
    expected = {
        "overall": {name: mean(values) for name, values in scores.items()},
        "by_type": {kind: {name: mean(values) for name, values in table.items()} for kind, table in sorted(by_type.items())},
    }
    with open(os.path.join(OUT, "benchmark.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "predictions.jsonl"), "w") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "expected_report.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    overall = expected["overall"]
    print(f"{len(cases)} cases; fixture file of {len(records)} records: "
          + ", ".join(f"{k} {v['mean']:.4f} ({v['count']})" for k, v in overall.items()))


if __name__ == "__main__":
    main()
