//! memvp: memory-space visual prompting (MemVP, ICML 2024) for frozen CLIP vision towers and
//! frozen LLaMA / T5 / BART language models.
//!
//! Layers, top to bottom (a module imports only from layers below it):
//! `app` (commands) → `vlm` (base + adapter) → `train`, `generate`, `eval`, `data` →
//! `adapters` (methods) → `models` (backbones) → `checkpoint`, `ops` (kernels) →
//! `settings`, `rng`, `util`, `dist` (leaves; `dist` moves bytes between the processes of an MPI
//! job). `generate::stepper` is a leaf too: the models implement it.

pub mod adapters;
pub mod app;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod eval;
pub mod generate;
pub mod models;
pub mod ops;
pub mod rng;
pub mod settings;
pub mod train;
pub mod util;
pub mod vlm;
