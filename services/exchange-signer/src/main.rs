//! Entry point of the exchange-signer binary: the shared runtime runs [`exchange_signer::SPEC`].

fn main() -> std::process::ExitCode {
    engram_runtime::run_main(exchange_signer::SPEC, exchange_signer::routes)
}
