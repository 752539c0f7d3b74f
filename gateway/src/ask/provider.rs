//! Model providers: an OpenAI-compatible Chat Completions client (OpenAI, OpenRouter, Ollama,
//! vLLM, llama.cpp's server, DeepSeek and others, chosen by base URL) and the Anthropic Messages
//! API. Both stream (server-sent events), time out, and retry with backoff on 429 and 5xx
//! before the stream starts. API keys live only in this process's memory and in request
//! headers; any echo of a key in a provider's error text is masked before it is shown.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// OpenAI Chat Completions (`POST {base}/chat/completions`, `Authorization: Bearer`).
    Openai,
    /// Anthropic Messages (`POST {base}/v1/messages`, `x-api-key`).
    Anthropic,
}

/// A configured provider.
#[derive(Clone)]
pub struct Provider {
    /// Its name in configuration and in `%%ask --provider`.
    pub name: String,
    /// Its API.
    pub kind: Kind,
    /// Base URL (`https://api.openai.com/v1`, `https://api.anthropic.com`, `http://127.0.0.1:11434/v1`).
    pub base_url: String,
    /// The API key, if one is set (local servers may need none).
    pub key: Option<String>,
    /// Whether a key is required.
    pub needs_key: bool,
    /// Time for the whole call.
    pub timeout: Duration,
    /// Time without a byte before a stream counts as stalled.
    pub idle_timeout: Duration,
    /// Attempts for a call that meets 429 or 5xx (1 = no retry).
    pub attempts: u32,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Why a call failed, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// No key is configured.
    #[error(
        "no API key for provider {0:?}: set the environment variable named in its `key_env`, or \
         run `sandgate set-key {0}`"
    )]
    NoKey(String),
    /// The provider refused the key.
    #[error("provider {0:?} refused the API key ({1})")]
    BadKey(String, String),
    /// The provider does not know the model.
    #[error("provider {0:?} has no model {1:?} ({2})")]
    UnknownModel(String, String, String),
    /// Too many requests, even after waiting.
    #[error("provider {0:?} is rate-limiting requests; try again later ({1})")]
    RateLimited(String, String),
    /// The provider could not be reached, failed, or stalled.
    #[error("provider {0:?} is unavailable: {1}")]
    Unavailable(String, String),
    /// The reply could not be understood.
    #[error("provider {0:?} sent a reply that could not be read: {1}")]
    Malformed(String, String),
    /// Another error the provider reported.
    #[error("provider {0:?} answered HTTP {1}: {2}")]
    Other(String, u16, String),
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `user` or `assistant`.
    pub role: &'static str,
    /// The text.
    pub text: String,
}

/// A chat request.
#[derive(Debug, Clone)]
pub struct Chat {
    /// The model.
    pub model: String,
    /// The system prompt.
    pub system: String,
    /// The conversation.
    pub turns: Vec<Turn>,
    /// Most tokens to generate.
    pub max_tokens: u32,
}

/// A finished completion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// The whole text.
    pub text: String,
    /// Prompt tokens the provider counted.
    pub input_tokens: u64,
    /// Completion tokens the provider counted.
    pub output_tokens: u64,
}

/// The HTTP client the providers share.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The shared HTTP client (TLS with the bundled Mozilla roots; no system certificate store).
pub fn http_client() -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// Masks `key` wherever it (or its first and last eight characters) appears in `text`.
pub fn redact(text: &str, key: Option<&str>) -> String {
    let Some(key) = key.filter(|k| k.len() >= 8) else {
        return text.to_owned();
    };
    let mut out = text.replace(key, "[key]");
    for part in [&key[..8], &key[key.len() - 8..]] {
        out = out.replace(part, "[key]");
    }
    out
}

/// Reads server-sent events from a byte stream: `(event name, data)` per event.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            let text = &self.buffer;
            let end = text
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
                .or_else(|| {
                    text.windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| (p, 4))
                });
            let Some((at, sep)) = end else { break };
            let block = String::from_utf8_lossy(&self.buffer[..at]).into_owned();
            self.buffer.drain(..at + sep);
            let (mut name, mut data) = (String::new(), Vec::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                }
            }
            if !data.is_empty() || !name.is_empty() {
                events.push((name, data.join("\n")));
            }
        }
        events
    }
}

impl Provider {
    fn request(&self, chat: &Chat) -> Result<Request<Full<Bytes>>, ProviderError> {
        let key = match (&self.key, self.needs_key) {
            (Some(k), _) => Some(k.as_str()),
            (None, true) => return Err(ProviderError::NoKey(self.name.clone())),
            (None, false) => None,
        };
        let base = self.base_url.trim_end_matches('/');
        let (url, body) = match self.kind {
            Kind::Openai => {
                let mut messages = vec![json!({"role": "system", "content": chat.system})];
                messages.extend(
                    chat.turns
                        .iter()
                        .map(|t| json!({"role": t.role, "content": t.text})),
                );
                (
                    format!("{base}/chat/completions"),
                    json!({"model": chat.model, "messages": messages, "stream": true,
                           "stream_options": {"include_usage": true}, "max_tokens": chat.max_tokens}),
                )
            }
            Kind::Anthropic => {
                let messages: Vec<Value> = chat
                    .turns
                    .iter()
                    .map(|t| json!({"role": t.role, "content": t.text}))
                    .collect();
                (
                    format!("{base}/v1/messages"),
                    json!({"model": chat.model, "system": chat.system, "messages": messages,
                           "max_tokens": chat.max_tokens, "stream": true}),
                )
            }
        };
        let mut req = Request::post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream")
            .header(
                header::USER_AGENT,
                concat!("sandgate/", env!("CARGO_PKG_VERSION")),
            );
        match (self.kind, key) {
            (Kind::Openai, Some(k)) => {
                req = req.header(header::AUTHORIZATION, format!("Bearer {k}"))
            }
            (Kind::Anthropic, Some(k)) => req = req.header("x-api-key", k),
            (_, None) => {}
        }
        if self.kind == Kind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        req.body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| {
                ProviderError::Unavailable(
                    self.name.clone(),
                    format!("invalid base URL {url:?}: {e}"),
                )
            })
    }

    /// The provider's error text from an error body (both APIs put it in `error.message`).
    fn error_text(&self, body: &[u8]) -> String {
        let text = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
        redact(&text, self.key.as_deref())
    }

    /// Streams a completion; `on_text` hears each piece of text as it arrives.
    pub async fn complete(
        &self,
        client: &HttpsClient,
        chat: &Chat,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion, ProviderError> {
        let name = self.name.clone();
        let unavailable = |d: String| ProviderError::Unavailable(name.clone(), d);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let req = self.request(chat)?;
            let sent = tokio::time::timeout_at(deadline, client.request(req)).await;
            let retry_wait = match sent {
                Err(_) => {
                    return Err(unavailable(format!(
                        "no answer within {} s",
                        self.timeout.as_secs()
                    )));
                }
                Ok(Err(e)) => {
                    if attempt >= self.attempts {
                        return Err(unavailable(format!("cannot reach {}: {e}", self.base_url)));
                    }
                    Duration::from_millis(500 << (attempt - 1))
                }
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    if status.is_success() {
                        break resp;
                    }
                    let retry_after = resp
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok());
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let text = self.error_text(&body);
                    let retryable = status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error()
                        || status.as_u16() == 529;
                    if !retryable || attempt >= self.attempts {
                        return Err(match status.as_u16() {
                            401 | 403 => ProviderError::BadKey(name.clone(), text),
                            404 => {
                                ProviderError::UnknownModel(name.clone(), chat.model.clone(), text)
                            }
                            429 => ProviderError::RateLimited(name.clone(), text),
                            s if s >= 500 => unavailable(format!("HTTP {s}: {text}")),
                            s => ProviderError::Other(name.clone(), s, text),
                        });
                    }
                    let backoff = Duration::from_millis(500 << (attempt - 1));
                    retry_after
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 30.0)))
                        .unwrap_or(backoff)
                }
            };
            tracing::info!(provider = %self.name, attempt, wait_ms = retry_wait.as_millis() as u64, "retrying a model call");
            tokio::time::sleep_until((tokio::time::Instant::now() + retry_wait).min(deadline))
                .await;
        };
        let mut body = response.into_body();
        let mut parser = SseParser::default();
        let mut done = Completion::default();
        let mut finished = false;
        while !finished {
            let idle = tokio::time::Instant::now() + self.idle_timeout;
            let frame = match tokio::time::timeout_at(idle.min(deadline), body.frame()).await {
                Err(_) => {
                    return Err(unavailable(format!(
                        "the reply stalled (nothing for {} s)",
                        self.idle_timeout.as_secs()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(unavailable(format!("the reply broke off: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for (event, data) in parser.push(&data) {
                match self.kind {
                    Kind::Openai => {
                        if data.trim() == "[DONE]" {
                            finished = true;
                            break;
                        }
                        let v: Value = serde_json::from_str(&data).map_err(|e| {
                            ProviderError::Malformed(
                                name.clone(),
                                format!("a stream event is not JSON: {e}"),
                            )
                        })?;
                        if let Some(err) = v.get("error") {
                            return Err(unavailable(redact(
                                err["message"].as_str().unwrap_or("error"),
                                self.key.as_deref(),
                            )));
                        }
                        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                            done.text.push_str(t);
                            on_text(t);
                        }
                        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                            done.input_tokens =
                                u["prompt_tokens"].as_u64().unwrap_or(done.input_tokens);
                            done.output_tokens = u["completion_tokens"]
                                .as_u64()
                                .unwrap_or(done.output_tokens);
                        }
                    }
                    Kind::Anthropic => {
                        if data.is_empty() {
                            continue;
                        }
                        let v: Value = serde_json::from_str(&data).map_err(|e| {
                            ProviderError::Malformed(
                                name.clone(),
                                format!("a stream event is not JSON: {e}"),
                            )
                        })?;
                        match (event.as_str(), v["type"].as_str().unwrap_or_default()) {
                            (_, "message_start") => {
                                done.input_tokens =
                                    v["message"]["usage"]["input_tokens"].as_u64().unwrap_or(0);
                            }
                            (_, "content_block_delta") => {
                                if let Some(t) = v["delta"]["text"].as_str() {
                                    done.text.push_str(t);
                                    on_text(t);
                                }
                            }
                            (_, "message_delta") => {
                                done.output_tokens = v["usage"]["output_tokens"]
                                    .as_u64()
                                    .unwrap_or(done.output_tokens);
                            }
                            (_, "message_stop") => {
                                finished = true;
                                break;
                            }
                            (_, "error") => {
                                let text = redact(
                                    v["error"]["message"].as_str().unwrap_or("error"),
                                    self.key.as_deref(),
                                );
                                return Err(unavailable(text));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if !finished {
            return Err(ProviderError::Malformed(
                name,
                "the stream ended before it was complete".into(),
            ));
        }
        if done.text.is_empty() {
            return Err(ProviderError::Malformed(
                name,
                "the reply had no text".into(),
            ));
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: message_start\ndata: {\"a\"").is_empty());
        let e = p.push(b":1}\n\ndata: [DONE]\n\n");
        assert_eq!(
            e,
            vec![
                ("message_start".into(), "{\"a\":1}".into()),
                (String::new(), "[DONE]".into())
            ]
        );
        assert_eq!(
            p.push(b"data: x\r\n\r\n"),
            vec![(String::new(), "x".into())]
        );
    }

    #[test]
    fn keys_are_masked_in_error_text() {
        let key = "sk-test-0123456789abcdef";
        let text = format!(
            "Incorrect API key provided: {key}. Also sk-test-0***cdef and {}",
            &key[..8]
        );
        let out = redact(&text, Some(key));
        assert!(
            !out.contains(key) && !out.contains(&key[..8]) && !out.contains(&key[key.len() - 8..]),
            "{out}"
        );
    }
}
