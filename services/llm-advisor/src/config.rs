//! The advisor's own settings: where the model server is (the seed's `LMSTUDIO_URL` and
//! `LMSTUDIO_TIMEOUT`), how to ask it, and how to protect it.

use std::time::Duration;

use engram_runtime::ServiceConfig;
use engram_runtime::config::ConfigReader;
use url::Url;

/// Everything the advisor reads beyond the shared runtime settings.
#[derive(Debug, Clone)]
pub struct AdvisorConfig {
    /// `LMSTUDIO_URL` (default `http://127.0.0.1:1234`, LM Studio's own).
    pub base_url: Url,
    /// `LMSTUDIO_TIMEOUT`: total time for one answer, in seconds (default 10).
    pub timeout: Duration,
    /// `ENGRAM_LLM_CONNECT_TIMEOUT_SECS` (default 2).
    pub connect_timeout: Duration,
    /// `ENGRAM_LLM_MODEL`: the model to use; unset, the first the server lists.
    pub model: Option<String>,
    /// `ENGRAM_LLM_TEMPERATURE` (0 to 2, default 0.2).
    pub temperature: f64,
    /// `ENGRAM_LLM_MAX_TOKENS` (default 300).
    pub max_tokens: u32,
    /// `ENGRAM_LLM_BREAKER_FAILURES`: consecutive failures that open the breaker (default 5).
    pub breaker_failures: u32,
    /// `ENGRAM_LLM_BREAKER_COOLDOWN_SECS` (default 30).
    pub breaker_cooldown: Duration,
    /// `ENGRAM_LLM_MAX_CONCURRENT` requests to the model server (default 4).
    pub max_concurrent: u32,
    /// `ENGRAM_LLM_REQUESTS_PER_MINUTE` (default 60).
    pub requests_per_minute: u32,
}

impl ServiceConfig for AdvisorConfig {
    fn read(reader: &mut ConfigReader<'_>) -> Self {
        let base_url = reader
            .url_or("LMSTUDIO_URL", "http://127.0.0.1:1234")
            .unwrap_or_else(|| {
                Url::parse("http://127.0.0.1:1234").unwrap_or_else(|_| unreachable!())
            });
        let timeout = reader.positive_secs_or("LMSTUDIO_TIMEOUT", Duration::from_secs(10));
        let connect_timeout =
            reader.positive_secs_or("ENGRAM_LLM_CONNECT_TIMEOUT_SECS", Duration::from_secs(2));
        let model = reader.optional_string("ENGRAM_LLM_MODEL");
        let temperature = reader.parsed_or(
            "ENGRAM_LLM_TEMPERATURE",
            0.2,
            "a number between 0 and 2",
            |raw| match raw.parse::<f64>() {
                Ok(t) if (0.0..=2.0).contains(&t) => Ok(t),
                _ => Err(format!("{raw:?} is out of range")),
            },
        );
        Self {
            base_url,
            timeout,
            connect_timeout,
            model,
            temperature,
            max_tokens: reader.positive_u32_or("ENGRAM_LLM_MAX_TOKENS", 300),
            breaker_failures: reader.positive_u32_or("ENGRAM_LLM_BREAKER_FAILURES", 5),
            breaker_cooldown: reader
                .positive_secs_or("ENGRAM_LLM_BREAKER_COOLDOWN_SECS", Duration::from_secs(30)),
            max_concurrent: reader.positive_u32_or("ENGRAM_LLM_MAX_CONCURRENT", 4),
            requests_per_minute: reader.positive_u32_or("ENGRAM_LLM_REQUESTS_PER_MINUTE", 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_runtime::config::MapSource;

    #[test]
    fn every_bad_value_is_reported() {
        let env = MapSource::from_pairs([
            ("LMSTUDIO_URL", "100.118.172.23:1234"),
            ("LMSTUDIO_TIMEOUT", "0"),
            ("ENGRAM_LLM_TEMPERATURE", "3"),
            ("ENGRAM_LLM_MAX_CONCURRENT", "0"),
        ]);
        let mut reader = ConfigReader::new(vec![&env]);
        let _ = AdvisorConfig::read(&mut reader);
        let names: Vec<String> = reader
            .finish()
            .expect_err("bad")
            .0
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "LMSTUDIO_URL",
                "LMSTUDIO_TIMEOUT",
                "ENGRAM_LLM_TEMPERATURE",
                "ENGRAM_LLM_MAX_CONCURRENT"
            ]
        );
    }
}
