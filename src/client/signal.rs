//! A signaling client over a real WebSocket (protocol v1, docs/signaling.md).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Why a signaling exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the node closed the connection")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the node refused: {code}: {message}")]
    Refused { code: String, message: String },
}

/// One participant's signaling connection.
pub struct SignalClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Unsolicited messages seen while waiting for replies.
    pub events: Vec<Value>,
    timeout: Duration,
}

impl SignalClient {
    /// Connects to `ws_url` and joins with `token`; returns the client and the `joined` message.
    pub async fn join(ws_url: &str, token: &str) -> Result<(SignalClient, Value), SignalError> {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
        let mut c = SignalClient {
            ws,
            next_id: 1,
            events: Vec::new(),
            timeout: Duration::from_secs(10),
        };
        c.send(json!({"type":"join","version":1,"token":token}))
            .await?;
        let joined = c.next().await?;
        if joined["type"] == "joined" {
            Ok((c, joined))
        } else {
            Err(refused(&joined))
        }
    }

    async fn send(&mut self, v: Value) -> Result<(), SignalError> {
        self.ws.send(Message::Text(v.to_string().into())).await?;
        Ok(())
    }

    async fn next(&mut self) -> Result<Value, SignalError> {
        loop {
            let msg = tokio::time::timeout(self.timeout, self.ws.next())
                .await
                .map_err(|_| SignalError::Timeout(self.timeout))?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(v) = serde_json::from_str(&t) {
                        return Ok(v);
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Err(SignalError::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Sends a request and waits for its reply; an `error` reply is returned as `Refused`.
    pub async fn request(&mut self, mut body: Value) -> Result<Value, SignalError> {
        let id = self.next_id;
        self.next_id += 1;
        body["requestId"] = json!(id);
        self.send(body).await?;
        loop {
            let m = self.next().await?;
            if m["requestId"] == json!(id) {
                return if m["type"] == "error" {
                    Err(refused(&m))
                } else {
                    Ok(m)
                };
            }
            self.events.push(m);
        }
    }

    /// Waits for an unsolicited message of type `ty`.
    pub async fn event(&mut self, ty: &str) -> Result<Value, SignalError> {
        if let Some(i) = self.events.iter().position(|e| e["type"] == ty) {
            return Ok(self.events.remove(i));
        }
        loop {
            let m = self.next().await?;
            if m["type"] == ty {
                return Ok(m);
            }
            self.events.push(m);
        }
    }

    /// Leaves the session.
    pub async fn leave(mut self) {
        let _ = self.send(json!({"type":"leave"})).await;
        let _ = self.ws.close(None).await;
    }
}

fn refused(m: &Value) -> SignalError {
    SignalError::Refused {
        code: m["code"].as_str().unwrap_or("unknown").to_owned(),
        message: m["message"].as_str().unwrap_or_default().to_owned(),
    }
}
