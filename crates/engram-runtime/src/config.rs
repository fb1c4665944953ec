//! Typed, validated configuration from environment variables and an optional TOML file.
//!
//! Values come from a [`ConfigSource`] (the process environment in production, a map in
//! tests) layered over an optional file named by `ENGRAM_CONFIG_FILE`. Every value is parsed
//! and checked at start; problems are collected into one [`ConfigErrors`] so the operator sees
//! all of them at once, and the binary exits with [`EXIT_CONFIG`] (64, `EX_USAGE`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

/// Exit code for an invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// Where raw configuration strings come from. Tests pass a map instead of mutating the
/// process environment.
pub trait ConfigSource {
    /// The raw value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl ConfigSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A fixed map of variables, for tests and for layering a file under the environment.
#[derive(Debug, Default, Clone)]
pub struct MapSource(pub BTreeMap<String, String>);

impl MapSource {
    /// Builds a source from `(name, value)` pairs.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl ConfigSource for MapSource {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// One bad configuration value: which variable, and what is wrong with it. The offending
/// value is never echoed, since it may be a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The variable name, for example `ENGRAM_VAULT_ADDR`.
    pub name: String,
    /// What is wrong, for example "is not a valid URL: relative URL without a base".
    pub message: String,
}

/// Every problem found while reading a configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {}: {}", problem.name, problem.message)?;
        }
        Ok(())
    }
}

/// Reads typed values from a source, collecting every problem instead of stopping at the
/// first. Call [`ConfigReader::finish`] once everything has been read.
pub struct ConfigReader<'a> {
    layers: Vec<&'a dyn ConfigSource>,
    problems: Vec<ConfigProblem>,
}

impl fmt::Debug for ConfigReader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigReader")
            .field("layers", &self.layers.len())
            .field("problems", &self.problems)
            .finish()
    }
}

impl<'a> ConfigReader<'a> {
    /// A reader over layers, highest priority first (for example the environment, then a file).
    pub fn new(layers: Vec<&'a dyn ConfigSource>) -> Self {
        Self {
            layers,
            problems: Vec::new(),
        }
    }

    /// Records a problem found by the caller's own cross-field checks.
    pub fn problem(&mut self, name: &str, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            name: name.to_owned(),
            message: message.into(),
        });
    }

    /// The raw value: the first layer that has it, with surrounding whitespace trimmed; an
    /// empty value counts as unset.
    pub fn raw(&self, name: &str) -> Option<String> {
        self.layers
            .iter()
            .find_map(|layer| layer.get(name))
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    }

    /// A string, or `None` when unset.
    pub fn optional_string(&mut self, name: &str) -> Option<String> {
        self.raw(name)
    }

    /// A string that must be set.
    pub fn required_string(&mut self, name: &str) -> Option<String> {
        let value = self.raw(name);
        if value.is_none() {
            self.problem(name, "is required but not set");
        }
        value
    }

    /// A string with a default.
    pub fn string_or(&mut self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_owned())
    }

    /// A secret value (never echoed in errors or logs), or `None` when unset.
    pub fn optional_secret(&mut self, name: &str) -> Option<SecretString> {
        self.raw(name).map(SecretString::from)
    }

    /// A value parsed with `parse`, with a default; `what` describes the expected form.
    pub fn parsed_or<T>(
        &mut self,
        name: &str,
        default: T,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T
    where
        T: Clone,
    {
        match self.raw(name) {
            None => default,
            Some(raw) => match parse(&raw) {
                Ok(value) => value,
                Err(reason) => {
                    self.problem(name, format!("is not {what}: {reason}"));
                    default
                }
            },
        }
    }

    /// An absolute `http` or `https` URL, or `None` when unset.
    pub fn optional_url(&mut self, name: &str) -> Option<Url> {
        let raw = self.raw(name)?;
        match parse_http_url(&raw) {
            Ok(url) => Some(url),
            Err(reason) => {
                self.problem(name, format!("is not a valid http(s) URL: {reason}"));
                None
            }
        }
    }

    /// An absolute `http` or `https` URL that must be set.
    pub fn required_url(&mut self, name: &str) -> Option<Url> {
        if self.raw(name).is_none() {
            self.problem(name, "is required but not set");
            return None;
        }
        self.optional_url(name)
    }

    /// Whether gRPC runs over mutual TLS (`ENGRAM_TLS_MODE` is `vault`, the default, or
    /// `file`), which decides the scheme of every peer's URL.
    pub fn grpc_tls_on(&self) -> bool {
        self.raw("ENGRAM_TLS_MODE")
            .is_none_or(|mode| !mode.eq_ignore_ascii_case("off"))
    }

    fn grpc_scheme_checked(&mut self, name: &str, url: Url) -> Option<Url> {
        let expected = if self.grpc_tls_on() { "https" } else { "http" };
        if url.scheme() == expected {
            return Some(url);
        }
        self.problem(
            name,
            if expected == "https" {
                "must be an https:// URL: gRPC runs over mutual TLS (ENGRAM_TLS_MODE)"
            } else {
                "must be an http:// URL while ENGRAM_TLS_MODE=off"
            },
        );
        None
    }

    /// A peer's gRPC URL, or `None` when unset: `https://` with mutual TLS, `http://` without.
    pub fn optional_grpc_url(&mut self, name: &str) -> Option<Url> {
        let url = self.optional_url(name)?;
        self.grpc_scheme_checked(name, url)
    }

    /// A peer's gRPC URL with a default `host:port`, in the scheme the TLS mode asks for.
    pub fn grpc_url_or(&mut self, name: &str, default_host_port: &str) -> Option<Url> {
        if self.raw(name).is_none() {
            let scheme = if self.grpc_tls_on() { "https" } else { "http" };
            return parse_http_url(&format!("{scheme}://{default_host_port}")).ok();
        }
        self.optional_grpc_url(name)
    }

    /// A peer's gRPC URL that must be set.
    pub fn required_grpc_url(&mut self, name: &str) -> Option<Url> {
        if self.raw(name).is_none() {
            self.problem(name, "is required but not set");
            return None;
        }
        self.optional_grpc_url(name)
    }

    /// A URL with a default.
    pub fn url_or(&mut self, name: &str, default: &str) -> Option<Url> {
        if self.raw(name).is_none() {
            return parse_http_url(default).ok();
        }
        self.optional_url(name)
    }

    /// A socket address such as `127.0.0.1:50051`, with a default.
    pub fn socket_addr_or(&mut self, name: &str, default: SocketAddr) -> SocketAddr {
        self.parsed_or(name, default, "a socket address (host:port)", |raw| {
            raw.parse::<SocketAddr>().map_err(|e| e.to_string())
        })
    }

    /// A positive duration in seconds (fractions allowed, for example `0.5`), with a default.
    /// Zero, negative, non-finite and absurdly long values (over a day) are rejected.
    pub fn positive_secs_or(&mut self, name: &str, default: Duration) -> Duration {
        self.parsed_or(
            name,
            default,
            "a positive number of seconds",
            parse_positive_secs,
        )
    }

    /// A positive integer with a default.
    pub fn positive_u32_or(&mut self, name: &str, default: u32) -> u32 {
        self.parsed_or(name, default, "a positive integer", |raw| {
            match raw.parse::<u32>() {
                Ok(0) => Err("must be greater than zero".to_owned()),
                Ok(n) => Ok(n),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    /// One of a fixed set of lower-case words, with a default.
    pub fn choice_or<'c>(&mut self, name: &str, default: &'c str, choices: &[&'c str]) -> &'c str {
        let Some(raw) = self.raw(name) else {
            return default;
        };
        let lowered = raw.to_ascii_lowercase();
        match choices.iter().find(|choice| **choice == lowered) {
            Some(choice) => choice,
            None => {
                self.problem(name, format!("must be one of: {}", choices.join(", ")));
                default
            }
        }
    }

    /// A path with a default.
    pub fn path_or(&mut self, name: &str, default: &str) -> PathBuf {
        PathBuf::from(self.string_or(name, default))
    }

    /// Ends reading: `Ok` when no problem was recorded, else every problem at once.
    ///
    /// # Errors
    ///
    /// [`ConfigErrors`] listing each bad value, in the order they were read.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.problems))
        }
    }
}

/// Parses an absolute `http`/`https` URL with a host.
///
/// # Errors
///
/// A human-readable reason when the text is not such a URL.
pub fn parse_http_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(url)
}

fn parse_positive_secs(raw: &str) -> Result<Duration, String> {
    let secs: f64 = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a number"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err("must be greater than zero".to_owned());
    }
    if secs > 86_400.0 {
        return Err("must be at most 86400 (one day)".to_owned());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Reads the optional TOML configuration file named by `ENGRAM_CONFIG_FILE`: a flat table
/// of the same variable names (`ENGRAM_GRPC_ADDR = "0.0.0.0:50051"`). The environment wins
/// over the file.
///
/// # Errors
///
/// A [`ConfigProblem`] when the file cannot be read, is not TOML, or holds a non-scalar value.
pub fn load_file_layer(env: &dyn ConfigSource) -> Result<MapSource, ConfigProblem> {
    const NAME: &str = "ENGRAM_CONFIG_FILE";
    let Some(path) = env.get(NAME).filter(|p| !p.trim().is_empty()) else {
        return Ok(MapSource::default());
    };
    let problem = |message: String| ConfigProblem {
        name: NAME.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path.trim())
        .map_err(|e| problem(format!("cannot read {}: {e}", path.trim())))?;
    parse_file_layer(&text).map_err(problem)
}

/// Parses the text of a configuration file into a layer.
///
/// # Errors
///
/// A reason when the text is not a flat TOML table of scalars.
pub fn parse_file_layer(text: &str) -> Result<MapSource, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("is not valid TOML: {}", e.message()))?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let scalar = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(format!("key {key:?} must be a string, number or boolean")),
        };
        values.insert(key, scalar);
    }
    Ok(MapSource(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_over(source: &MapSource) -> ConfigReader<'_> {
        ConfigReader::new(vec![source])
    }

    #[test]
    fn collects_every_problem_before_failing() {
        let source = MapSource::from_pairs([
            ("URL", "not a url"),
            ("INTERVAL", "0"),
            ("ADDR", "localhost"),
        ]);
        let mut reader = reader_over(&source);
        assert!(reader.optional_url("URL").is_none());
        let _ = reader.positive_secs_or("INTERVAL", Duration::from_secs(5));
        let _ = reader.socket_addr_or("ADDR", "127.0.0.1:1".parse().expect("addr"));
        let _ = reader.required_string("MISSING");
        let errors = reader.finish().expect_err("four problems");
        let names: Vec<_> = errors.0.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["URL", "INTERVAL", "ADDR", "MISSING"]);
        let text = errors.to_string();
        assert!(text.contains("4 problem(s)"), "{text}");
    }

    #[test]
    fn urls_must_be_absolute_http() {
        for bad in ["ftp://host", "http://", "/relative", "host:8200", "http//x"] {
            assert!(parse_http_url(bad).is_err(), "{bad} should be rejected");
        }
        assert!(parse_http_url("https://vault.example:8200/").is_ok());
    }

    #[test]
    fn durations_must_be_positive_finite_and_bounded() {
        for bad in ["0", "-1", "NaN", "inf", "abc", "100000", ""] {
            assert!(
                parse_positive_secs(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert_eq!(parse_positive_secs("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn empty_values_count_as_unset_and_defaults_apply() {
        let source = MapSource::from_pairs([("A", "   ")]);
        let mut reader = reader_over(&source);
        assert_eq!(reader.string_or("A", "dflt"), "dflt");
        assert_eq!(reader.positive_u32_or("B", 7), 7);
        reader.finish().expect("no problems");
    }

    #[test]
    fn choice_is_case_insensitive_and_lists_options() {
        let source = MapSource::from_pairs([("OK", "JSON"), ("BAD", "xml")]);
        let mut reader = reader_over(&source);
        assert_eq!(reader.choice_or("OK", "text", &["json", "text"]), "json");
        let _ = reader.choice_or("BAD", "text", &["json", "text"]);
        let errors = reader.finish().expect_err("bad choice");
        assert!(errors.0[0].message.contains("json, text"));
    }

    #[test]
    fn problems_never_echo_the_value() {
        let source = MapSource::from_pairs([("ENGRAM_X", "hunter2-secretish")]);
        let mut reader = reader_over(&source);
        let _ = reader.positive_u32_or("ENGRAM_X", 1);
        let errors = reader.finish().expect_err("bad");
        assert!(!errors.to_string().contains("hunter2"), "{errors}");
    }

    #[test]
    fn file_layer_is_flat_scalars_and_env_wins() {
        let file = parse_file_layer("ENGRAM_A = \"file\"\nENGRAM_B = 3\n").expect("valid");
        let env = MapSource::from_pairs([("ENGRAM_A", "env")]);
        let reader = ConfigReader::new(vec![&env, &file]);
        assert_eq!(reader.raw("ENGRAM_A").as_deref(), Some("env"));
        assert_eq!(reader.raw("ENGRAM_B").as_deref(), Some("3"));
        assert!(parse_file_layer("[table]\nx = 1").is_err());
        assert!(parse_file_layer("not = = toml").is_err());
    }

    #[test]
    fn unreadable_file_is_a_problem_not_a_panic() {
        let env = MapSource::from_pairs([("ENGRAM_CONFIG_FILE", "/nonexistent/engram.toml")]);
        let problem = load_file_layer(&env).expect_err("missing file");
        assert_eq!(problem.name, "ENGRAM_CONFIG_FILE");
    }
}
