//! The input-space baseline (LLaVA / VL-Adapter style: projected visual tokens placed before
//! the text, LM adapted with LoRA) and plain LoRA (image-blind reference).

pub mod lora;
