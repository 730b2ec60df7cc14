//! memvp: memory-space visual prompting (MemVP, ICML 2024) for frozen CLIP vision towers and
//! frozen LLaMA / T5 / BART language models.

pub mod baselines;
pub mod beam;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod eval;
pub mod generate;
pub mod image;
pub mod lm;
pub mod memvp;
pub mod models;
pub mod ops;
pub mod quickstart;
pub mod rng;
pub mod run;
pub mod train;
pub mod util;
pub mod vision;
pub mod vlm;
