//! Prompt texts. ScienceQA formats follow the released MemVP/LaVIN code (see METHOD.md):
//! input `Question: {q}\nContext: {c}\nOptions: (A) .. (B) ..\nResponse:`, target
//! `The answer is {L}.`; the prompt and the target are tokenized separately and joined.

use anyhow::{Result, bail};

pub const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

pub fn choice_text(choices: &[String]) -> String {
    choices.iter().enumerate().map(|(i, c)| format!("({}) {}", LETTERS[i] as char, c)).collect::<Vec<_>>().join(" ")
}

/// A ScienceQA-style problem, already reduced to its parts.
pub struct McParts<'a> {
    pub question: &'a str,
    pub context: &'a str,
    pub choices: &'a [String],
    pub answer: usize,
    pub lecture: &'a str,
    pub solution: &'a str,
}

/// `(prompt, target)` for a format `INPUT-OUTPUT` such as `QCM-A`.
pub fn multiple_choice(format: &str, p: &McParts) -> Result<(String, String)> {
    let Some((inp, out)) = format.split_once('-') else {
        bail!("prompt format `{format}`: expected INPUT-OUTPUT like QCM-A")
    };
    if p.answer >= p.choices.len() || p.choices.len() > LETTERS.len() {
        bail!("answer index {} outside {} choices", p.answer, p.choices.len())
    }
    let choice = choice_text(p.choices);
    let letter = LETTERS[p.answer] as char;
    let lecture = p.lecture.replace('\n', "\\n");
    let solution = p.solution.replace('\n', "\\n");
    let (q, c) = (p.question, p.context);
    let input = match inp {
        "QCM" => format!("Question: {q}\nContext: {c}\nOptions: {choice}\n"),
        "CQM" => format!("Context: {c}\nQuestion: {q}\nOptions: {choice}\n"),
        "QM" => format!("Question: {q}\nOptions: {choice}\n"),
        "QCML" => format!("Question: {q}\nContext: {c}\nOptions: {choice}\nBECAUSE: {lecture}\n"),
        "QCME" => format!("Question: {q}\nContext: {c}\nOptions: {choice}\nBECAUSE: {solution}\n"),
        other => bail!("prompt format `{format}`: unknown input part `{other}` (known: QCM, CQM, QM, QCML, QCME)"),
    };
    let output = match out {
        "A" => format!("The answer is {letter}."),
        "LA" => format!("{lecture} The answer is {letter}."),
        "EA" => format!("{solution} The answer is {letter}."),
        "LEA" => format!("{lecture} {solution} The answer is {letter}."),
        other => {
            bail!("prompt format `{format}`: unknown output part `{other}` (known: A, LA, EA, LEA)")
        }
    };
    let input = format!("{}\nResponse:", input.replace("  ", " ").trim());
    Ok((input, output.replace("  ", " ").trim().to_string()))
}

/// The letter-to-index rule of the evaluation: the first capital letter of the generated text;
/// -1 when there is none or it names no choice.
pub fn parse_choice(generated: &str, n_choices: usize) -> i64 {
    match generated.chars().find(|c| c.is_ascii_uppercase()) {
        Some(c) => {
            let i = (c as u8 - b'A') as usize;
            if i < n_choices { i as i64 } else { -1 }
        }
        None => -1,
    }
}

pub const DEFAULT_VQA_TEMPLATE: &str = "Question: {question}\nAnswer:";

pub fn open_ended(template: Option<&str>, question: &str) -> String {
    template.unwrap_or(DEFAULT_VQA_TEMPLATE).replace("{question}", question)
}
