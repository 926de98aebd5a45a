//! Event streams served without hyper: a second, deliberately small HTTP/1.1 server.
//!
//! Why it exists: an event stream is mostly idle, and Herald holds many of them. Served
//! by hyper, each connection keeps hyper's read and write buffers (8 KiB each) for as
//! long as it is open; served here, an idle SSE stream costs 4.3 KiB instead of 13.2 KiB
//! (`herald-bench --subscribers 10000 idle-sse`). So a connection whose first request is
//! a plain GET for an event stream (a path ending in `/events`), arriving whole and alone
//! in the first read, is answered by writing the routes' response straight onto the
//! socket: the head, then each event as it comes (the events already waiting gathered
//! into one `write`), with the body ended by closing the connection (`Connection:
//! close`). Everything else is left to hyper: another method or path, a head that comes
//! in pieces, and a head followed by more bytes (a pipelined request, which hyper
//! answers in turn).

use std::io::Write;
use std::pin::pin;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warp::http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, HeaderName, HeaderValue, TRANSFER_ENCODING, UPGRADE,
};
use warp::http::{Request, StatusCode, Version, response};
use warp::reply::Response;

use super::Routes;
use super::client_stream::ClientStream;
use crate::http::{self, Peer, Refusal};

/// The most bytes of a request head looked at; a longer head is left to hyper.
const PEEK_BYTES: usize = 4096;

/// The most header fields looked at; a request with more is left to hyper.
const MAX_HEADERS: usize = 64;

/// How long a connection turned away has to send its head, and then to take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Events already waiting are gathered into one write up to this size.
const BATCH_BYTES: usize = 64 * 1024;

/// A GET request for an event stream, still unread on its connection.
pub(crate) struct EventStreamRequest {
    request: Request<Empty<Bytes>>,
    /// How many bytes the request head takes on the wire.
    head_len: usize,
}

/// Waits for the connection's first bytes and, if they are a whole event-stream request
/// head, returns the request (leaving the bytes unread). `None` leaves the connection
/// to hyper, untouched.
pub(crate) async fn peek_event_stream(stream: &TcpStream) -> Option<EventStreamRequest> {
    let mut bytes = vec![0; PEEK_BYTES];
    let n = stream.peek(&mut bytes).await.ok()?;
    parse_event_stream(&bytes[..n])
}

/// The request in `bytes` if they are exactly one whole head of a GET for a path ending
/// in `/events`, without a body or an upgrade; `None` for anything else, including a
/// head with a pipelined request behind it and what hyper would refuse as malformed
/// (hyper answers those).
fn parse_event_stream(bytes: &[u8]) -> Option<EventStreamRequest> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(head_len) = head.parse(bytes).ok()? else {
        return None;
    };
    if head_len < bytes.len() {
        return None;
    }
    let path = head.path?;
    if head.method != Some("GET") || !path.split('?').next()?.ends_with("/events") {
        return None;
    }
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = path.parse().ok()?;
    *request.version_mut() = match head.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    for field in head.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let has_body = (name == CONTENT_LENGTH && field.value != b"0") || name == TRANSFER_ENCODING;
        if has_body || name == UPGRADE {
            return None;
        }
        let value = HeaderValue::from_bytes(field.value).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(EventStreamRequest { request, head_len })
}

impl EventStreamRequest {
    /// The request, marked as coming from `peer`.
    pub(crate) fn with_peer(mut self, peer: Peer) -> Self {
        self.request.extensions_mut().insert(peer);
        self
    }
}

/// Reads the request off `stream`, answers it with `routes`, and closes the
/// connection when the response ends, the client goes away, or a write fails (a
/// [`ClientStream`] gives up on a write that stalls).
pub(crate) async fn respond(mut stream: ClientStream, request: EventStreamRequest, routes: Routes) {
    let mut head = vec![0; request.head_len];
    if stream.read_exact(&mut head).await.is_err() {
        return;
    }
    drop(head);
    let service = TowerToHyperService::new(warp::service(routes));
    let Ok(response) = hyper::service::Service::call(&service, request.request).await;
    let (parts, body) = response.into_parts();
    let head = encode_head(&parts, body.size_hint().exact());
    drop(parts);
    if stream.write_all(&head).await.is_err() {
        return;
    }
    drop(head);
    write_body(&mut stream, body).await;
}

/// A whole response, head and body, for an answer written in one go.
pub(crate) async fn whole(response: Response) -> Bytes {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = encode_head(&parts, Some(body.len() as u64));
    out.extend_from_slice(&body);
    out.into()
}

/// Answers a connection that got no slot and closes it: its head is read for a moment
/// to tell an event stream (which gets the `retry:` answer) from other requests.
pub(crate) async fn refuse(mut stream: TcpStream, why: Refusal) {
    let mut head = vec![0; PEEK_BYTES];
    let read = tokio::time::timeout(REFUSAL_TIME, stream.read(&mut head)).await;
    let n = read.ok().and_then(Result::ok).unwrap_or(0);
    let answer = whole(http::refusal(why, parse_event_stream(&head[..n]).is_some())).await;
    drop(head);
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // What the client still sends is read and dropped, so that closing does not
        // reset the connection before the client has read the answer.
        tokio::io::copy(&mut stream, &mut tokio::io::sink()).await
    })
    .await;
}

/// The response head: status line, the routes' headers, and the framing of a body
/// that ends with the connection (or has the exact `length`).
fn encode_head(parts: &response::Parts, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let status = parts.status;
    // Writing into a Vec cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if name != CONNECTION && name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if let (Some(length), false) = (length, bodiless) {
        let _ = write!(head, "{CONTENT_LENGTH}: {length}\r\n");
    }
    if !parts.headers.contains_key(DATE) {
        let _ = write!(
            head,
            "{DATE}: {}\r\n",
            httpdate::fmt_http_date(SystemTime::now())
        );
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// Writes the body's data as it comes, each time with whatever else is already waiting
/// (up to [`BATCH_BYTES`]), until it ends, the client goes away, or a write fails.
/// Bytes the client sends meanwhile are read and dropped, so that its closing is seen
/// at once.
async fn write_body<B: Body<Data = Bytes>>(stream: &mut ClientStream, body: B) {
    let mut body = pin!(body);
    let mut dropped = [0; 64];
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            read = stream.read(&mut dropped) => match read {
                Ok(n) if n > 0 => continue,
                _ => return,
            },
        };
        let Some(Ok(frame)) = frame else {
            return;
        };
        let Ok(first) = frame.into_data() else {
            continue;
        };
        let mut batch: Option<BytesMut> = None;
        let mut ended = false;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < BATCH_BYTES {
            match body.frame().now_or_never() {
                None => break,
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        batch
                            .get_or_insert_with(|| BytesMut::from(&first[..]))
                            .extend_from_slice(&data);
                    }
                }
                Some(_) => {
                    ended = true;
                    break;
                }
            }
        }
        let written = match batch {
            Some(batch) => stream.write_all(&batch).await,
            None => stream.write_all(&first).await,
        };
        if written.is_err() || ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Option<EventStreamRequest> {
        parse_event_stream(head.as_bytes())
    }

    #[test]
    fn whole_get_heads_for_event_streams_are_taken() {
        let head = "GET /v1/events?groups=a,b HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nLast-Event-ID: 7\r\n\r\n";
        let taken = parsed(head).expect("an event stream request");
        assert_eq!(taken.head_len, head.len());
        assert_eq!(taken.request.uri(), "/v1/events?groups=a,b");
        assert_eq!(taken.request.version(), Version::HTTP_11);
        assert_eq!(taken.request.headers()["last-event-id"], "7");
        let old =
            parsed("GET /v1/channels/c/events HTTP/1.0\r\n\r\n").expect("an event stream request");
        assert_eq!(old.request.version(), Version::HTTP_10);
        assert!(parsed("GET /v1/groups/g/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n").is_some());
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for head in [
            "GET /v1/channels/c/events HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            "GET /v1/channels/c/messages HTTP/1.1\r\n\r\n",
            "GET /v1/events/more HTTP/1.1\r\n\r\n",
            "GET /v1/x?then=/events HTTP/1.1\r\n\r\n",
            "POST /v1/events HTTP/1.1\r\n\r\n",
            "HEAD /v1/events HTTP/1.1\r\n\r\n",
            "GET /v1/events HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /v1/ws/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/events HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /v1/channels/c/events HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
        ] {
            assert!(parsed(head).is_none(), "{head:?}");
        }
        let many = format!(
            "GET /v1/events HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parsed(&many).is_none());
    }

    #[test]
    fn the_head_ends_the_body_with_the_connection_unless_its_length_is_known() {
        let (mut parts, ()) = warp::http::Response::new(()).into_parts();
        parts.headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        parts
            .headers
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let head = String::from_utf8(encode_head(&parts, None)).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "),
            "{head}"
        );
        assert!(head.ends_with("\r\nconnection: close\r\n\r\n"), "{head}");
        assert!(
            !head.contains("transfer-encoding") && !head.contains("content-length"),
            "{head}"
        );
        parts.status = StatusCode::BAD_REQUEST;
        let head = String::from_utf8(encode_head(&parts, Some(42))).unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 42\r\n"), "{head}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        #[test]
        fn mutated_heads_are_taken_whole_or_left_to_hyper(edits in crate::testing::edits(0)) {
            let head = crate::testing::mutated(
                b"GET /v1/events?group=a HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: 7\r\n\r\n",
                &edits,
            );
            if let Some(taken) = parse_event_stream(&head) {
                proptest::prop_assert_eq!(taken.head_len, head.len());
            }
        }
    }
}
