//! An edit site as S3 website hosting serves it, from the bucket through the S3 API, on
//! loopback: what the browser check loads (what is live, not `dist/`), and what
//! `edit-worker preview` offers people running locally (moto, LocalStack, or AWS itself).
//!
//! The rules of S3's website endpoint that a site relies on: `/` and every path ending in `/`
//! serve that folder's `index.html`; a path naming a folder without the slash
//! (`/about`) is redirected to `/about/` when `about/index.html` exists; what does not exist
//! is the site's `404.html` with status 404 (a plain 404 when it has none). Only GET and
//! HEAD, HTTP/1.1 with one request per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The longest request head read: a browser's GET is well under 2 KB.
const MAX_HEAD_BYTES: usize = 16 << 10;
/// A client that sends no complete request head in this time is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once: a page loads a few dozen files; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;
/// The error document S3 website hosting is configured with for edit sites.
const ERROR_DOCUMENT: &str = "404.html";
const INDEX_DOCUMENT: &str = "index.html";

/// A running server; dropping it stops accepting (requests in progress finish).
pub struct SiteServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl SiteServer {
    /// Serve `bucket` on `127.0.0.1:port` (0: any free port).
    pub async fn start(
        s3: aws_sdk_s3::Client,
        bucket: String,
        port: u16,
    ) -> std::io::Result<SiteServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(accept(
            listener,
            Arc::new(Site { s3, bucket }),
            stop.clone(),
        ));
        Ok(SiteServer { addr, stop })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SiteServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Site {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

async fn accept(listener: TcpListener, site: Arc<Site>, stop: CancellationToken) {
    let room = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = room.clone().acquire_owned() => p.expect("never closed"),
        };
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let site = site.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &site).await {
                        tracing::debug!(error = %e, "site server connection");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "site server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    head_only: bool,
    /// The decoded path, with its leading `/`, without the query.
    path: String,
}

#[derive(Debug, PartialEq, Eq)]
enum BadRequest {
    /// Not GET or HEAD.
    Method,
    Malformed,
}

async fn serve(mut stream: TcpStream, site: &Site) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) | Err(_) => {
            return respond_plain(&mut stream, 400, "Bad Request", false).await;
        }
        Ok(Err(e)) => return Err(e),
    };
    match parse_request(&head) {
        Ok(request) => answer(&mut stream, site, &request).await,
        Err(BadRequest::Method) => {
            respond_plain(&mut stream, 405, "Method Not Allowed", false).await
        }
        Err(BadRequest::Malformed) => respond_plain(&mut stream, 400, "Bad Request", false).await,
    }
}

/// The request head, up to its blank line; `None` when it is too long or the client left.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
    }
}

fn parse_request(head: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(head).map_err(|_| BadRequest::Malformed)?;
    let line = text.lines().next().ok_or(BadRequest::Malformed)?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Err(BadRequest::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(BadRequest::Malformed);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(BadRequest::Method),
    };
    let raw = target.split(['?', '#']).next().unwrap_or("/");
    let path = percent_decode(raw).ok_or(BadRequest::Malformed)?;
    Ok(Request { head_only, path })
}

/// `%XX` decoded; `None` for a bad escape or a result that is not UTF-8 (S3 keys are).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The key S3 website hosting reads for `path`.
fn key_for(path: &str) -> String {
    let key = path.trim_start_matches('/');
    if key.is_empty() || key.ends_with('/') {
        format!("{key}{INDEX_DOCUMENT}")
    } else {
        key.to_owned()
    }
}

/// The worker's bookkeeping in the bucket (owner record, lease fences, deploy records, kept
/// bytes) is not the site: the README's bucket policy denies public reads of it, and this server
/// answers as that policy would (403). Only the browser check's screenshots and records under
/// `.edit-worker/checks/` are public, since completed events link them.
fn is_private(key: &str) -> bool {
    key.starts_with(crate::steps::publish::RESERVED_PREFIX) && !key.starts_with(PUBLIC_BOOKKEEPING)
}

/// The one public part of the bookkeeping.
const PUBLIC_BOOKKEEPING: &str = ".edit-worker/checks/";

async fn answer(stream: &mut TcpStream, site: &Site, request: &Request) -> std::io::Result<()> {
    let key = key_for(&request.path);
    if is_private(&key) {
        return respond_plain(stream, 403, "Forbidden", request.head_only).await;
    }
    if let Some(object) = site.get(&key).await? {
        return send_object(stream, 200, object, request.head_only).await;
    }
    // `/about` for the folder `about/`: S3 redirects to the slash.
    if !request.path.ends_with('/') && site.exists(&format!("{key}/{INDEX_DOCUMENT}")).await? {
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            request.path
        );
        return stream.write_all(head.as_bytes()).await;
    }
    match site.get(ERROR_DOCUMENT).await? {
        Some(object) => send_object(stream, 404, object, request.head_only).await,
        None => respond_plain(stream, 404, "Not Found", request.head_only).await,
    }
}

impl Site {
    /// The object at `key`, or `None` when there is none. Other S3 errors are I/O errors (the
    /// connection ends; the browser reports the request as failed).
    async fn get(
        &self,
        key: &str,
    ) -> std::io::Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>> {
        match self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(SdkError::ServiceError(e)) if matches!(e.err(), GetObjectError::NoSuchKey(_)) => {
                Ok(None)
            }
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(std::io::Error::other(format!(
                "reading {key} from {}: {}",
                self.bucket,
                aws_sdk_s3::error::DisplayErrorContext(e)
            ))),
        }
    }

    async fn exists(&self, key: &str) -> std::io::Result<bool> {
        match self
            .s3
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
            Err(e) => Err(std::io::Error::other(format!(
                "looking up {key} in {}: {}",
                self.bucket,
                aws_sdk_s3::error::DisplayErrorContext(e)
            ))),
        }
    }
}

async fn send_object(
    stream: &mut TcpStream,
    status: u16,
    object: aws_sdk_s3::operation::get_object::GetObjectOutput,
    head_only: bool,
) -> std::io::Result<()> {
    let content_type = object
        .content_type()
        .unwrap_or("application/octet-stream")
        .to_owned();
    let length = object.content_length().unwrap_or(0).max(0);
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {}\r\nContent-Length: {length}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        sanitize_header(&content_type),
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        // Streamed: an object is never held whole in the worker's memory.
        let mut body = object.body.into_async_read();
        tokio::io::copy(&mut body, stream).await?;
    }
    stream.flush().await
}

async fn respond_plain(
    stream: &mut TcpStream,
    status: u16,
    text: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let body = if head_only { "" } else { text };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        reason(status),
        text.len()
    );
    stream.write_all(head.as_bytes()).await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "",
    }
}

/// A header value from the bucket (an object's content type) cannot add header lines.
fn sanitize_header(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bookkeeping_is_private_but_the_screenshots() {
        assert!(is_private(".edit-worker/owner.json"));
        assert!(is_private(
            ".edit-worker/deploys/a/b/000001-0123456789ab.json"
        ));
        assert!(is_private(".edit-worker/objects/0123/1"));
        assert!(is_private(".edit-worker/lease/a/b.json"));
        assert!(!is_private(".edit-worker/checks/x/index.png"));
        assert!(!is_private("index.html"));
        assert!(!is_private("edit-worker/owner.json"));
    }

    #[test]
    fn folders_serve_their_index_document() {
        assert_eq!(key_for("/"), "index.html");
        assert_eq!(key_for("/about/"), "about/index.html");
        assert_eq!(key_for("/a/b/"), "a/b/index.html");
        assert_eq!(key_for("/_astro/x.css"), "_astro/x.css");
        assert_eq!(key_for("/about"), "about");
    }

    #[test]
    fn requests_are_read_as_s3_would_read_their_path() {
        let r = parse_request(b"GET /caf%C3%A9/?q=1 HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(r.path, "/café/");
        assert!(!r.head_only);
        assert!(parse_request(b"HEAD / HTTP/1.1").unwrap().head_only);
        assert_eq!(parse_request(b"POST / HTTP/1.1"), Err(BadRequest::Method));
        assert_eq!(
            parse_request(b"GET http://evil/ HTTP/1.1"),
            Err(BadRequest::Malformed)
        );
        assert_eq!(
            parse_request(b"GET /%zz HTTP/1.1"),
            Err(BadRequest::Malformed)
        );
        assert_eq!(
            parse_request(b"GET /%ff HTTP/1.1"),
            Err(BadRequest::Malformed)
        );
    }

    #[test]
    fn a_content_type_cannot_add_header_lines() {
        assert_eq!(
            sanitize_header("text/html\r\nSet-Cookie: a=b"),
            "text/htmlSet-Cookie: a=b"
        );
    }
}
