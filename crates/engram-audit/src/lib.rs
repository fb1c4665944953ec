//! Engram's audit trail format: records and their hash chain, segments and signed
//! checkpoints, redaction of sensitive fields, and the verifier. Pure file logic, shared by
//! the audit sink (which writes) and `engramctl audit verify` (which only reads).

pub mod format;
pub mod record;
pub mod redact;
pub mod verify;
