//! `OpenAiClient`: OpenAI's chat-completions API over an [`ApiClient`], so
//! every call is rate limited, circuit broken, pooled, retried and
//! authenticated by the same pipeline as any other upstream.
//!
//! ```no_run
//! # async fn demo(net: happynet::Network) -> Result<(), happynet::HttpError> {
//! let openai = happynet::gateway::openai::OpenAiClient::new(net.api("openai").expect("configured"));
//! let answer = openai.chat_completion("Hello, world!").await?;
//! # let _ = answer; Ok(()) }
//! ```
//!
//! Retries follow the upstream policy, with two rules of OpenAI's own: a 429
//! whose error is `insufficient_quota` is final (no wait cures an empty
//! account), and a streamed completion is only retried before its first
//! byte — after that the caller has seen part of an answer.

use super::sse::SseParser;
use crate::upstream::{ApiClient, HttpError, Response, StreamingResponse};
use actix_web::web::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The model used when a request names none.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// The path of the chat-completions endpoint, relative to the client's base URL.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// A chat-completions request. Fields this type does not name are kept in
/// `extra` and sent as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Everything else (tools, response_format, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatRequest {
    /// A request with one user message.
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        ChatRequest {
            model: model.into(),
            messages: vec![ChatMessage::user(prompt)],
            temperature: None,
            max_tokens: None,
            stream: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Its index.
    pub index: u32,
    /// The generated message.
    pub message: ChatMessage,
    /// Why generation stopped.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A complete (non-streamed) chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The completion's id.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// The choices (usually one).
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    #[serde(default)]
    pub usage: Option<Usage>,
}

impl ChatResponse {
    /// The first choice's text.
    pub fn text(&self) -> Option<&str> {
        self.choices.first().map(|c| c.message.content.as_str())
    }
}

/// One piece of a streamed completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatDelta {
    /// Which choice it extends.
    pub index: u32,
    /// The role, on the first delta.
    pub role: Option<String>,
    /// Text to append.
    pub content: Option<String>,
    /// Set on the last delta of a choice.
    pub finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: DeltaJson,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct DeltaJson {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

/// True for OpenAI's "insufficient_quota" 429, which no retry can cure.
pub fn is_insufficient_quota(resp: &Response) -> bool {
    #[derive(Deserialize)]
    struct Body {
        error: ErrorBody,
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        code: Option<String>,
    }
    resp.status == 429
        && serde_json::from_slice::<Body>(&resp.body).is_ok_and(|b| {
            b.error.code.as_deref() == Some("insufficient_quota")
                || b.error.kind.as_deref() == Some("insufficient_quota")
        })
}

/// A client for OpenAI's API (or any compatible server) over a configured
/// `network.api_clients.<name>`.
#[derive(Clone)]
pub struct OpenAiClient {
    api: ApiClient,
    model: String,
}

impl OpenAiClient {
    /// A client over `api` using [`DEFAULT_MODEL`].
    pub fn new(api: ApiClient) -> Self {
        OpenAiClient {
            api,
            model: DEFAULT_MODEL.to_owned(),
        }
    }

    /// The same client with another default model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// The API client underneath.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The simple case: one prompt, the answer's text.
    pub async fn chat_completion(&self, prompt: &str) -> Result<String, HttpError> {
        let response = self
            .create_chat_completion(&ChatRequest::new(self.model.clone(), prompt))
            .await?;
        response
            .text()
            .map(str::to_owned)
            .ok_or_else(|| HttpError::Decode {
                upstream: self.api.name().to_owned(),
                message: "the completion has no choices".into(),
            })
    }

    /// The full case: a typed request, a typed response.
    pub async fn create_chat_completion(
        &self,
        request: &ChatRequest,
    ) -> Result<ChatResponse, HttpError> {
        let mut request = request.clone();
        request.stream = None;
        // A completion is not idempotent in general, but repeating one that
        // failed with 429/5xx before producing anything is what every
        // OpenAI SDK does; the retry budget keeps it from becoming a storm.
        let resp = self
            .api
            .post(CHAT_COMPLETIONS_PATH)
            .json(&request)
            .retry_non_idempotent()
            .give_up_if(is_insufficient_quota)
            .send()
            .await?;
        resp.json()
    }

    /// A streamed completion: deltas as the server sends them, ending at
    /// `[DONE]`. Retried only until the first byte arrives.
    pub async fn stream_chat_completion(
        &self,
        request: &ChatRequest,
    ) -> Result<impl Stream<Item = Result<ChatDelta, HttpError>>, HttpError> {
        let mut request = request.clone();
        request.stream = Some(true);
        let upstream = self.api.name().to_owned();
        let body = self
            .api
            .post(CHAT_COMPLETIONS_PATH)
            .json(&request)
            .typed_header(
                actix_web::http::header::ACCEPT,
                actix_web::http::header::HeaderValue::from_static("text/event-stream"),
            )
            .retry_non_idempotent()
            .give_up_if(is_insufficient_quota)
            .send_streaming()
            .await?;
        Ok(deltas(upstream, body))
    }
}

/// Turns a streamed body of chat-completion chunks into deltas.
fn deltas(
    upstream: String,
    body: StreamingResponse,
) -> impl Stream<Item = Result<ChatDelta, HttpError>> {
    struct State {
        upstream: String,
        body: StreamingResponse,
        parser: SseParser,
        ready: VecDeque<ChatDelta>,
        done: bool,
    }
    let state = State {
        upstream,
        body,
        parser: SseParser::new(),
        ready: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(delta) = st.ready.pop_front() {
                return Some((Ok(delta), st));
            }
            if st.done {
                return None;
            }
            let chunk: Bytes = match st.body.next_chunk().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    let e = HttpError::Transport {
                        upstream: st.upstream.clone(),
                        message: "the stream ended before [DONE]".into(),
                    };
                    return Some((Err(e), st));
                }
            };
            let events = match st.parser.push(&chunk) {
                Ok(events) => events,
                Err(e) => {
                    st.done = true;
                    let e = HttpError::Decode {
                        upstream: st.upstream.clone(),
                        message: e.to_string(),
                    };
                    return Some((Err(e), st));
                }
            };
            for event in events {
                if event.data.trim() == "[DONE]" {
                    st.done = true;
                    break;
                }
                match serde_json::from_str::<ChunkJson>(&event.data) {
                    Ok(chunk) => st
                        .ready
                        .extend(chunk.choices.into_iter().map(|c| ChatDelta {
                            index: c.index,
                            role: c.delta.role,
                            content: c.delta.content,
                            finish_reason: c.finish_reason,
                        })),
                    Err(e) => {
                        st.done = true;
                        st.ready.clear();
                        let e = HttpError::Decode {
                            upstream: st.upstream.clone(),
                            message: format!("bad chunk: {e}"),
                        };
                        return Some((Err(e), st));
                    }
                }
            }
        }
    })
}
