//! `GET /api/kernels/{id}/channels`: the WebSocket upgrade and the bridge between one client and
//! its kernel.
//!
//! The framing is chosen as Jupyter Server chooses it: `v1.kernel.websocket.jupyter.org` when the
//! client offers it in `Sec-WebSocket-Protocol`, the legacy JSON protocol otherwise (which is
//! what JupyterLab's server speaks to a gateway). A client's `session_id` query parameter names
//! its mailbox, so a client that reconnects gets what it missed; of several sockets of one
//! session, the one the client speaks on takes the session's messages and the others are
//! closed (after their requests in flight are read and sent to the kernel).
//!
//! A frame that cannot be decoded closes the connection with a close code and a reason that
//! says what was wrong (1007 for undecodable bytes, 1008 for a message that breaks the protocol,
//! 1009 for one over the size cap): the client learns exactly what was refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

use super::frames::{self, Frame, Protocol};
use super::{ApiError, App};
use crate::session::Kernel;

/// How much of a client's socket is read at once. tungstenite zeroes this much of its buffer
/// before every read (twice per request: the frame, then the read that finds nothing more), so
/// its default of 128 KiB costs more CPU than the frame of a typical request; a large message
/// is still read whole, in reads of this size.
const READ_BUFFER: usize = 16 * 1024;
/// How long a client's message may wait for a restarting kernel.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a socket the gateway closed is still read for requests sent before the client saw
/// the close.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

fn header_has(headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the handshake, answers `101 Switching Protocols` and hands the connection to
/// [`bridge`] once hyper has upgraded it.
pub fn upgrade(
    app: Arc<App>,
    mut req: Request<Incoming>,
    kernel: Arc<Kernel>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let headers = req.headers();
    if !header_has(headers, header::UPGRADE, "websocket")
        || !header_has(headers, header::CONNECTION, "upgrade")
    {
        return Err(ApiError::BadRequest(
            "this endpoint is a WebSocket: send Upgrade: websocket".into(),
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::BadRequest(
            "only WebSocket version 13 is supported".into(),
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(ApiError::BadRequest(
            "the WebSocket handshake has no Sec-WebSocket-Key".into(),
        ));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let protocol = if header_has(headers, header::SEC_WEBSOCKET_PROTOCOL, frames::V1_PROTOCOL) {
        Protocol::V1
    } else {
        Protocol::Legacy
    };
    let session_id = req
        .uri()
        .query()
        .map(crate::auth::form_pairs)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "session_id")
        .map(|(_, v)| v);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(app.config.http.max_ws_message_bytes))
        .max_frame_size(Some(app.config.http.max_ws_message_bytes));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                bridge(app, kernel, ws, protocol, session_id).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if protocol == Protocol::V1 {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(frames::V1_PROTOCOL),
        );
    }
    Ok(response)
}

fn close(code: CloseCode, reason: &str) -> WsMessage {
    // A close reason is at most 123 bytes; cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason[..end].to_owned()),
    }))
}

fn to_ws(frame: Frame) -> WsMessage {
    match frame {
        Frame::Text(t) => WsMessage::Text(t.into()),
        Frame::Binary(b) => WsMessage::Binary(b),
    }
}

/// Decodes a client's frame and sends it to the kernel for `session`; `Err` is the close to
/// answer with.
async fn relay(
    kernel: &Kernel,
    session: &str,
    conn: u64,
    protocol: Protocol,
    frame: Frame,
) -> Result<(), WsMessage> {
    let decoded = match frames::decode(protocol, &frame) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(kernel = %kernel.id, conn, error = %e, "refused a client message");
            let code = match e {
                frames::FrameError::Json(_) | frames::FrameError::Binary(_) => CloseCode::Invalid,
                _ => CloseCode::Policy,
            };
            return Err(close(code, &format!("refused: {e}")));
        }
    };
    kernel
        .send_from_client(
            session,
            decoded.channel,
            decoded.message,
            Some(decoded.msg_id),
            decoded.msg_type,
            SEND_TIMEOUT,
        )
        .await
        .map_err(|_| close(CloseCode::Away, "the kernel is not running"))
}

/// Relays between one WebSocket client and its kernel until either side ends.
async fn bridge(
    app: Arc<App>,
    kernel: Arc<Kernel>,
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    protocol: Protocol,
    session_id: Option<String>,
) {
    let attachment = kernel.attach(session_id.as_deref());
    let conn = attachment.conn;
    tracing::info!(kernel = %kernel.id, conn, ?protocol, "client connected");
    let (mut sink, mut stream) = ws.split();
    let mut closing = app.closing.clone();
    let mut kicked = attachment.kicked.clone();
    let ping_every = Duration::from_secs(app.config.http.ws_ping_interval_s.max(1));
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    let mut last_pong = tokio::time::Instant::now();
    let session = attachment.session.clone();
    // How the loop ends: the close frame to send, if any, and whether the client's requests
    // sent before it saw that close are still read (when the gateway closes a socket that
    // worked, not one that broke the protocol).
    let ending: Option<(WsMessage, bool)> = loop {
        tokio::select! {
            batch = kernel.next_batch(&attachment) => {
                // The batch is written with one flush (one write to the socket and one wake-up
                // of the client for a reply and its idle, say), not one per message. If the
                // connection fails, none of it is known to be written: it all goes back to the
                // session (its next socket may get a message twice rather than never).
                let mut written = true;
                for out in &batch {
                    if sink.feed(to_ws(frames::encode(protocol, out))).await.is_err() {
                        written = false;
                        break;
                    }
                }
                if !(written && sink.flush().await.is_ok()) {
                    kernel.give_back(&attachment, batch);
                    break None;
                }
            }
            incoming = stream.next() => {
                let message = match incoming {
                    None => break None,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        use tokio_tungstenite::tungstenite::Error as E;
                        break match e {
                            E::Capacity(c) => Some((close(CloseCode::Size, &format!("message too large: {c}")), false)),
                            E::Utf8(_) => Some((close(CloseCode::Invalid, "a text frame was not valid UTF-8"), false)),
                            E::Protocol(p) => Some((close(CloseCode::Protocol, &p.to_string()), false)),
                            _ => None,
                        };
                    }
                };
                let frame = match message {
                    WsMessage::Text(t) => Frame::Text(t.to_string()),
                    WsMessage::Binary(b) => Frame::Binary(b),
                    WsMessage::Pong(_) => {
                        last_pong = tokio::time::Instant::now();
                        continue;
                    }
                    WsMessage::Ping(_) | WsMessage::Frame(_) => continue,
                    WsMessage::Close(_) => break None,
                };
                // The socket the client speaks on is the one it reads.
                kernel.spoke(&attachment);
                if let Err(refusal) = relay(&kernel, &session, conn, protocol, frame).await {
                    break Some((refusal, false));
                }
            }
            _ = kicked.changed() => {
                let kick = kicked.borrow().clone();
                let (reason, drain) = kick.map(|k| (k.reason, k.drain)).unwrap_or_default();
                break Some((close(CloseCode::Away, &reason), drain));
            }
            () = crate::until_true(&mut closing) => {
                break Some((close(CloseCode::Away, "the gateway is shutting down"), false));
            }
            _ = ping.tick() => {
                if last_pong.elapsed() > 2 * ping_every + Duration::from_secs(5) {
                    break Some((close(CloseCode::Away, "no pong within two ping intervals"), false));
                }
                if sink.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some((close, drain)) = ending {
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(close)).await;
        if drain {
            drain_requests(&kernel, &session, conn, protocol, &mut stream, &mut closing).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    kernel.detach(&attachment);
    tracing::info!(kernel = %kernel.id, conn, "client disconnected");
}

/// After the gateway closed a socket while its kernel stays (another socket of its session took
/// over, or it read too slowly), reads what the client sent before it saw the close, up to its own close or
/// [`CLOSE_DRAIN`]: requests are still sent to the kernel and answered to the session's socket
/// in use, so none is lost to the switch.
async fn drain_requests(
    kernel: &Kernel,
    session: &str,
    conn: u64,
    protocol: Protocol,
    stream: &mut futures_util::stream::SplitStream<
        WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    >,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + CLOSE_DRAIN;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, stream.next()) => next,
            () = crate::until_true(closing) => return,
        };
        let frame = match next {
            Ok(Some(Ok(WsMessage::Text(t)))) => Frame::Text(t.to_string()),
            Ok(Some(Ok(WsMessage::Binary(b)))) => Frame::Binary(b),
            Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) | Err(_) => return,
            Ok(Some(Ok(_))) => continue,
        };
        tracing::debug!(kernel = %kernel.id, conn, "a request on a socket being closed: sent to the kernel");
        if relay(kernel, session, conn, protocol, frame).await.is_err() {
            return;
        }
    }
}
