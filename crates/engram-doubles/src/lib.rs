//! Doubles of the outside world that cannot be reached from here, as real HTTP servers that
//! speak the real wire formats. Used by tests and by the local stack, never by production
//! configuration.

pub mod exchange;
pub mod llm;
pub mod telegram;
