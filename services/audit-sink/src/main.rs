//! Entry point of the audit-sink binary: the shared runtime runs [`audit_sink::SPEC`].

fn main() -> std::process::ExitCode {
    engram_runtime::run_main(audit_sink::SPEC, audit_sink::routes)
}
