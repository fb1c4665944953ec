//! Entry point of the telegram-gateway binary: the shared runtime runs [`telegram_gateway::SPEC`].

fn main() -> std::process::ExitCode {
    engram_runtime::run_main(telegram_gateway::SPEC, telegram_gateway::routes)
}
