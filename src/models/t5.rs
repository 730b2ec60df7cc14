//! T5 (todo in this session)
