//! Answer metrics of the paper's benchmark tables, restating the official scorers:
//! - **VQA accuracy** (VQAv2, TextVQA, VizWiz): answers normalised like EvalAI
//!   (`EvalAIAnswerProcessor` of facebookresearch/pythia, later mmf, which TextVQA's and LLaVA's
//!   evaluators use), then `min(#matches / 3, 1)` averaged over the leave-one-out subsets of the
//!   reference answers (Antol et al., VQA, ICCV 2015; GT-Vision-Lab/VQA `vqaEval.py`).
//! - **ANLS** (DocVQA, InfographicVQA): `1 − NL` if it is at least 0.5 (normalised Levenshtein
//!   distance `NL ≤ 0.5`), else 0, best over the reference answers (Biten et al., ST-VQA, ICCV
//!   2019, arXiv 1905.13648; the threshold as the challenges' evaluation code applies it).
//!
//! Whitespace, digits and `float()` follow Python's rules (the official scorers are Python):
//! U+001C–U+001F are whitespace to `str.split`/`strip`, `\d` and `float()` take decimal digits of
//! every script.
//! - **Relaxed accuracy** (ChartQA): a number within 5 % of the reference, else an exact
//!   case-insensitive match (Masry et al., ChartQA, arXiv 2203.10244 §5.1; pix2struct `metrics.py`).
//! - **Exact match**: trimmed, lower-cased, final full stops dropped.
//!
//! `scripts/fixtures/eval_metrics_reference.py` restates each metric in Python; its output
//! (`tests/fixtures/eval/metric_cases.json`) is what the tests below compare with. This file has no
//! crate-internal imports so that the integration tests can include it with `#[path]`.

use std::fmt;

/// One benchmark metric; every one gives each question a score in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Vqa,
    Anls,
    Relaxed,
    Exact,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Vqa, Metric::Anls, Metric::Relaxed, Metric::Exact];

    /// The name in reports and TensorBoard tags.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Vqa => "vqa_accuracy",
            Metric::Anls => "anls",
            Metric::Relaxed => "relaxed_accuracy",
            Metric::Exact => "exact_match",
        }
    }

    /// `vqa`, `anls`, `relaxed`, `exact` (or the report names), or `all`.
    pub fn parse_list(text: &str) -> Result<Vec<Metric>, String> {
        let mut out = Vec::new();
        for word in text.split(',').map(str::trim) {
            let found: &[Metric] = match word {
                "vqa" | "vqa_accuracy" => &[Metric::Vqa],
                "anls" => &[Metric::Anls],
                "relaxed" | "relaxed_accuracy" => &[Metric::Relaxed],
                "exact" | "exact_match" => &[Metric::Exact],
                "all" => &Metric::ALL,
                other => return Err(format!("unknown metric `{other}` (expected vqa, anls, relaxed, exact or all)")),
            };
            for &m in found {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The score of `prediction` against the reference `answers` (at least one).
    pub fn score(self, prediction: &str, answers: &[String]) -> f64 {
        match self {
            Metric::Vqa => vqa_accuracy(prediction, answers),
            Metric::Anls => anls(prediction, answers),
            Metric::Relaxed => relaxed_accuracy(prediction, answers),
            Metric::Exact => exact_match(prediction, answers),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Python's text rules, which the official scorers inherit

/// Python's `str.isspace`, which `str.split()` and `str.strip()` use: Unicode whitespace and the
/// information separators U+001C–U+001F (Rust's `char::is_whitespace` leaves those out).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `text.strip()`.
fn py_strip(text: &str) -> &str {
    text.trim_matches(py_space)
}

/// Python's `text.split()`: the words between runs of [`py_space`].
fn py_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(py_space).filter(|w| !w.is_empty())
}

/// The first code point of every run of ten decimal digits (Unicode 14, general category `Nd`,
/// Python 3.11's `unicodedata`): Unicode keeps each script's digits 0–9 consecutive.
const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810,
    0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x11066,
    0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit of any script (Python's `unicodedata.decimal`, what `\d` in a
/// `str` pattern and `float()` accept): `٣` and `３` are 3; `²` and `Ⅲ` are not digits.
fn py_decimal(c: char) -> Option<u32> {
    let code = c as u32;
    let zero = DECIMAL_ZEROS[DECIMAL_ZEROS.partition_point(|&z| z <= code).checked_sub(1)?];
    (code - zero < 10).then_some(code - zero)
}

// ---------------------------------------------------------------------------------------------
// VQA accuracy

/// EvalAI's punctuation list (`PUNCTUATIONS`); `'` and `.` are handled elsewhere, `:` is kept.
const VQA_PUNCTUATION: [char; 21] = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// EvalAI's `NUMBER_MAP`: number words up to ten become digits ("none" counts as 0).
const VQA_NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const VQA_ARTICLES: [&str; 3] = ["a", "an", "the"];

/// EvalAI's `CONTRACTIONS`, kept as published: the keys with capitals (`Im`, `Ive`, `Id've`) can
/// never match a lower-cased word, and `somebody'd` maps to `somebodyd`; both are in the original.
const VQA_CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// Whether `text` has a run of commas between two digits (EvalAI's `COMMA_STRIP` search). After
/// `vqa_normalise` has dropped every comma this never holds; it is kept to follow the original.
fn has_comma_between_digits(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ',' {
            let start = i;
            while i < chars.len() && chars[i] == ',' {
                i += 1;
            }
            let before = start > 0 && py_decimal(chars[start - 1]).is_some();
            let after = i < chars.len() && py_decimal(chars[i]).is_some();
            if before && after {
                return true;
            }
        } else {
            i += 1;
        }
    }
    false
}

/// EvalAI's `process_punctuation`: a punctuation mark next to a space is deleted, one inside a
/// word becomes a space (`black/white` → `black white`); then full stops not followed by a digit
/// go (`3.5` keeps its point).
fn vqa_punctuation(text: &str) -> String {
    let glued_to_digits = has_comma_between_digits(text);
    let mut out = text.to_string();
    for p in VQA_PUNCTUATION {
        // The test reads the text as it came in, not as earlier marks left it.
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if spaced || glued_to_digits { "" } else { " " });
    }
    // `PERIOD_STRIP.sub("", text, re.UNICODE)` passes re.UNICODE (32) as sub's `count`, so only
    // the first 32 full stops can go. Python's `\d` is a decimal digit of any script (`3.٥` keeps
    // its point).
    let chars: Vec<char> = out.chars().collect();
    let mut removed = 0;
    let mut kept = String::with_capacity(out.len());
    for (i, &c) in chars.iter().enumerate() {
        let before_digit = chars.get(i + 1).is_some_and(|&n| py_decimal(n).is_some());
        if c == '.' && !before_digit && removed < 32 {
            removed += 1;
            continue;
        }
        kept.push(c);
    }
    kept
}

/// EvalAI's `process_digit_article`: number words to digits, articles dropped, contractions
/// given their apostrophes, words joined by single spaces.
fn vqa_digits_articles(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = py_words(&lower)
        .map(|w| VQA_NUMBERS.iter().find(|(word, _)| *word == w).map_or(w, |&(_, digit)| digit))
        .filter(|w| !VQA_ARTICLES.contains(w))
        .map(|w| VQA_CONTRACTIONS.iter().find(|(short, _)| *short == w).map_or(w, |&(_, long)| long))
        .collect();
    words.join(" ")
}

/// An answer as EvalAI compares it: lower case, no `,` or `?`, `'s` split off, punctuation and
/// full stops as in [`vqa_punctuation`], number words as digits, no articles, contractions fixed.
pub fn vqa_normalise(answer: &str) -> String {
    let tokenized = answer.to_lowercase().replace([',', '?'], "").replace("'s", " 's");
    let flat = py_strip(&tokenized).replace(['\n', '\t'], " ");
    vqa_digits_articles(&vqa_punctuation(py_strip(&flat)))
}

/// VQA accuracy of one question: the mean over the reference answers `i` of
/// `min(#{j ≠ i : answer_j == prediction} / 3, 1)` after [`vqa_normalise`]. With 10 references (the
/// VQA protocol) three agreeing humans give full credit. With a single reference there are no
/// others to agree with, so the score is the normalised exact match instead (our choice).
pub fn vqa_accuracy(prediction: &str, answers: &[String]) -> f64 {
    let predicted = vqa_normalise(prediction);
    let references: Vec<String> = answers.iter().map(|a| vqa_normalise(a)).collect();
    if references.len() == 1 {
        return (references[0] == predicted) as u8 as f64;
    }
    let mut total = 0.0;
    for left_out in 0..references.len() {
        let matches = references.iter().enumerate().filter(|&(j, a)| j != left_out && *a == predicted).count();
        total += (matches as f64 / 3.0).min(1.0);
    }
    total / references.len() as f64
}

// ---------------------------------------------------------------------------------------------
// ANLS

/// Levenshtein distance in characters (Unicode scalar values, as Python counts them).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + (ca != cb) as usize);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// How the DocVQA/InfographicVQA scorer compares: trimmed, lower case, runs of whitespace as one
/// space (case-insensitive but space-sensitive), whitespace as Python's `str.split()` has it.
fn anls_normalise(text: &str) -> String {
    py_words(&py_strip(text).to_lowercase()).collect::<Vec<_>>().join(" ")
}

/// ANLS of one question: the best over the references of `1 − NL`, kept when it is at least 0.5
/// (the normalised Levenshtein distance `NL = distance / longer length` at most 0.5), else 0. At
/// `NL = 0.5` exactly this follows the DocVQA / ST-VQA challenges' evaluation code, where
/// published numbers come from (`1 − NL < 0.5` scores 0), not the paper's text (`NL < 0.5`).
/// Two empty strings have `NL = 0`.
pub fn anls(prediction: &str, answers: &[String]) -> f64 {
    let predicted = anls_normalise(prediction);
    let mut best: f64 = 0.0;
    for answer in answers {
        let reference = anls_normalise(answer);
        let longest = predicted.chars().count().max(reference.chars().count());
        let nl = if longest == 0 { 0.0 } else { levenshtein(&predicted, &reference) as f64 / longest as f64 };
        let similarity = 1.0 - nl;
        let score = if similarity < 0.5 { 0.0 } else { similarity };
        best = best.max(score);
    }
    best
}

// ---------------------------------------------------------------------------------------------
// Relaxed accuracy

/// Python's `float(text)` for the texts it accepts: surrounding whitespace, a sign, `inf`/`nan`,
/// exponents, `_` between digits, and decimal digits of any script (`١٠٤`, `１２`). Like
/// CPython, non-ASCII whitespace becomes a space and non-ASCII digits their ASCII twins first
/// (any other non-ASCII character fails), then ASCII whitespace is stripped; U+001C–U+001F are not
/// stripped here, unlike `str.strip()`. Rust's parser takes the rest of the same grammar.
fn python_float(text: &str) -> Option<f64> {
    let ascii: String = text
        .chars()
        .map(|c| match c {
            c if c.is_ascii() => Some(c),
            c if py_space(c) => Some(' '),
            c => py_decimal(c).and_then(|d| char::from_digit(d, 10)),
        })
        .collect::<Option<_>>()?;
    let text = ascii.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\u{b}');
    let chars: Vec<char> = text.chars().collect();
    let digit_at = |i: usize| chars.get(i).is_some_and(|c| c.is_ascii_digit());
    for (i, &c) in chars.iter().enumerate() {
        if c == '_' && !(i > 0 && digit_at(i - 1) && digit_at(i + 1)) {
            return None;
        }
    }
    text.replace('_', "").parse::<f64>().ok()
}

/// pix2struct's `_to_float`: a trailing `%` divides by 100.
fn chart_number(text: &str) -> Option<f64> {
    match text.strip_suffix('%') {
        // `rstrip("%")` drops every trailing `%`.
        Some(_) => python_float(text.trim_end_matches('%')).map(|v| v / 100.0),
        None => python_float(text),
    }
}

/// pix2struct's `relaxed_correctness(target, prediction)`: when both parse as numbers and the
/// target is not 0, correct if `|prediction − target| / |target| ≤ 5 %`; otherwise the
/// lower-cased strings must be equal.
fn relaxed_correct(target: &str, prediction: &str) -> bool {
    let predicted = chart_number(prediction);
    let expected = chart_number(target);
    match (predicted, expected) {
        // Python tests the target for truth: 0.0 is false (and falls through), NaN is true.
        (Some(p), Some(t)) if t != 0.0 => (p - t).abs() / t.abs() <= 0.05,
        _ => prediction.to_lowercase() == target.to_lowercase(),
    }
}

/// Relaxed accuracy of one question: 1 if the prediction is relaxed-correct for any reference.
pub fn relaxed_accuracy(prediction: &str, answers: &[String]) -> f64 {
    answers.iter().any(|a| relaxed_correct(a, prediction)) as u8 as f64
}

// ---------------------------------------------------------------------------------------------
// Exact match

/// Answers compared after trimming, lower-casing and dropping final full stops.
pub fn exact_normalise(answer: &str) -> String {
    py_strip(py_strip(answer).trim_end_matches('.')).to_lowercase()
}

/// Exact match of one question: 1 if the normalised prediction equals any normalised reference.
pub fn exact_match(prediction: &str, answers: &[String]) -> f64 {
    let predicted = exact_normalise(prediction);
    answers.iter().any(|a| exact_normalise(a) == predicted) as u8 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Every hand-made case of `scripts/fixtures/eval_metrics_reference.py`, all four metrics. The Python
    /// restatement does the same double-precision operations in the same order, so the values
    /// agree to the last bit; the 1e-12 tolerance is there only to report both values on a miss.
    #[test]
    fn metrics_equal_the_python_restatement() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/metric_cases.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures/eval_metrics_reference.py)", path.display()));
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 40, "{} cases", cases.len());
        let mut failures = Vec::new();
        for case in cases {
            let prediction = case["prediction"].as_str().unwrap();
            let answers: Vec<String> = case["answers"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
            for metric in Metric::ALL {
                let expected = case["expected"][metric.name()].as_f64().unwrap();
                let got = metric.score(prediction, &answers);
                if (got - expected).abs() > 1e-12 {
                    failures.push(format!("{} `{prediction}` vs {answers:?}: {metric} {got} != {expected}", case["note"]));
                }
            }
            if let Some(normalised) = case["vqa_normalised"].as_str() {
                if vqa_normalise(prediction) != normalised {
                    failures.push(format!("{}: vqa_normalise(`{prediction}`) = `{}`, Python `{normalised}`", case["note"], vqa_normalise(prediction)));
                }
            }
        }
        assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn vqa_normalisation_by_hand() {
        assert_eq!(vqa_normalise("Two dogs."), "2 dogs");
        assert_eq!(vqa_normalise("The Stop sign!"), "stop sign");
        assert_eq!(vqa_normalise("dont"), "don't");
        assert_eq!(vqa_normalise("black/white"), "black white");
        assert_eq!(vqa_normalise("black / white"), "black white");
        assert_eq!(vqa_normalise("3.5"), "3.5");
        assert_eq!(vqa_normalise("1,000"), "1000");
        assert_eq!(vqa_normalise("man's hat"), "man 's hat");
        assert_eq!(vqa_normalise("\u{1c}Red\u{1f}car\u{1d}"), "red car");
        assert_eq!(vqa_normalise("3.\u{665}"), "3.\u{665}");
        assert_eq!(vqa_normalise("3.x"), "3x");
    }

    #[test]
    fn vqa_accuracy_by_hand() {
        // 10 references, 2 say "2": 8 subsets hold both (2/3), 2 subsets hold one (1/3).
        let answers = strings(&["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]);
        assert!((vqa_accuracy("two", &answers) - (8.0 * 2.0 / 3.0 + 2.0 / 3.0) / 10.0).abs() < 1e-15);
        assert_eq!(vqa_accuracy("3", &answers), 1.0);
        assert_eq!(vqa_accuracy("4", &answers), 0.0);
        assert_eq!(vqa_accuracy("A cat.", &strings(&["cat"])), 1.0);
    }

    #[test]
    fn anls_by_hand() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(anls("K7QZ", &strings(&["k7oz"])), 0.75);
        // NL = 0.5 exactly keeps 1 − NL, as the challenges' evaluation code does.
        assert_eq!(anls("ab", &strings(&["ac"])), 0.5);
        assert_eq!(anls("abc", &strings(&["axy"])), 0.0);
        // U+001C–U+001F separate words for Python's `str.split()`.
        assert_eq!(anls("dr.\u{1e}lobo", &strings(&["Dr. Lobo"])), 1.0);
        assert_eq!(anls("  Dr.   Lobo ", &strings(&["dear dr. lobo", "Dr. Lobo"])), 1.0);
    }

    #[test]
    fn relaxed_accuracy_by_hand() {
        assert_eq!(relaxed_accuracy("104", &strings(&["100"])), 1.0);
        assert_eq!(relaxed_accuracy("106", &strings(&["100"])), 0.0);
        assert_eq!(relaxed_accuracy("12%", &strings(&["0.12"])), 1.0);
        assert_eq!(relaxed_accuracy("0", &strings(&["0"])), 1.0);
        assert_eq!(relaxed_accuracy("0.0", &strings(&["0"])), 0.0);
        assert_eq!(relaxed_accuracy("Yes", &strings(&["yes"])), 1.0);
        assert_eq!(python_float("1_000"), Some(1000.0));
        assert_eq!(python_float("1__0"), None);
        assert_eq!(python_float("\u{663}.\u{665}"), Some(3.5));
        assert_eq!(python_float("\u{a0}\u{ff11}\u{ff12}"), Some(12.0));
        assert_eq!(python_float("1\u{b2}"), None);
        assert_eq!(python_float("\u{1c}42"), None);
        assert_eq!(python_float(" 4\u{1d7ce} \u{b}"), Some(40.0));
    }

    #[test]
    fn metric_lists_parse() {
        assert_eq!(Metric::parse_list("all").unwrap(), Metric::ALL.to_vec());
        assert_eq!(Metric::parse_list("anls,vqa").unwrap(), vec![Metric::Vqa, Metric::Anls]);
        assert!(Metric::parse_list("bleu").unwrap_err().contains("unknown metric `bleu`"));
    }
}
