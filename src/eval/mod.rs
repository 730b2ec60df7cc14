//! Scorers that reproduce the official evaluation tools: the VQA accuracy of `vqaEval.py`,
//! pycocoevalcap's caption metrics (with its PTB tokenisation, no Java), GQA's accuracy.

pub mod captions;
pub mod gqa;
pub mod vqa;
