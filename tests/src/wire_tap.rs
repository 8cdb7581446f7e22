//! [`WireTap`]: a loopback proxy in front of Postgres that writes down every
//! message its clients send, by type, so that a test can pin how many round
//! trips something takes (a `Q` is a simple query, an `S` a `Sync`: what
//! sqlx's `ping` sends, and what ends every extended-protocol exchange).
//!
//! Only the client's side is read; the server's is copied through as it
//! comes. Clients must not ask for TLS (`sslmode=disable`), or the tap would
//! see ciphertext: [`WireTap::options`] says so.

use std::sync::{Arc, Mutex};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The code of an `SSLRequest`, in place of a protocol version.
const SSL_REQUEST: u32 = 80_877_103;

/// A proxy of a test's own (see the module docs). Its connections stop when
/// it is dropped.
pub struct WireTap {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
    accepting: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl WireTap {
    /// A tap in front of the server at `upstream` (`host:port`), on a free
    /// loopback port. Needs a tokio runtime.
    pub async fn start(upstream: &str) -> WireTap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let accepting = tokio::spawn({
            let (seen, connections) = (seen.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let relay = tokio::spawn(relay(client, server, seen.clone()));
                    connections.lock().unwrap().push(relay);
                }
            }
        });
        WireTap {
            port,
            seen,
            accepting,
            connections,
        }
    }

    /// `options` pointed at the tap, without TLS.
    pub fn options(&self, options: &PgConnectOptions) -> PgConnectOptions {
        options
            .clone()
            .host("127.0.0.1")
            .port(self.port)
            .ssl_mode(PgSslMode::Disable)
    }

    /// What [`take`](Self::take) would return, left in place.
    pub fn peek(&self) -> String {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|&t| char::from(t))
            .collect()
    }

    /// The types of the messages clients sent since the last call (the
    /// start-up and its authentication included), in order, as characters:
    /// `"QQ"` is two simple queries.
    pub fn take(&self) -> String {
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        seen.into_iter().map(char::from).collect()
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.accepting.abort();
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

/// Copies one connection both ways, noting the type of each message the
/// client sends.
async fn relay(client: TcpStream, server: TcpStream, seen: Arc<Mutex<Vec<u8>>>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    // The start-up: messages without a type byte (an `SSLRequest` first, if
    // the client asks; the tap's clients are refused it by the server's 'N'
    // or never ask), then typed messages to the end.
    let mut typed = false;
    loop {
        let mut head = [0u8; 5];
        let head_len = if typed { 5 } else { 4 };
        if from_client.read_exact(&mut head[..head_len]).await.is_err() {
            break;
        }
        let len_at = usize::from(typed);
        let len = u32::from_be_bytes(head[len_at..len_at + 4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if from_client.read_exact(&mut body).await.is_err() {
            break;
        }
        if typed {
            seen.lock().unwrap().push(head[0]);
        } else {
            let code = body
                .get(..4)
                .map_or(0, |c| u32::from_be_bytes(c.try_into().unwrap()));
            // After an SSLRequest comes the start-up itself, still untyped.
            typed = code != SSL_REQUEST;
        }
        if to_server.write_all(&head[..head_len]).await.is_err()
            || to_server.write_all(&body).await.is_err()
        {
            break;
        }
    }
    back.abort();
}
