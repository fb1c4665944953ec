//! Entry point of the llm-advisor binary: the shared runtime runs [`llm_advisor::SPEC`].

fn main() -> std::process::ExitCode {
    engram_runtime::run_main(llm_advisor::SPEC, llm_advisor::routes)
}
