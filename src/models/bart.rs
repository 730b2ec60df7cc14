//! BART
