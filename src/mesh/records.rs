//! Audit records crossing the mesh: a participant joined to a node outside its session's
//! residency region has its records written by the session's recording node, in that
//! region. The sending side waits for the recording node's answer where the session may not
//! go on unrecorded (a join, a verification step); the answer says the entry is on that
//! node's disk.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Internal;
use crate::ids::{NodeId, PipeId, RegionId, SessionId};
use crate::proto::pipe::RecordEntry;

/// Longest a record waits for the recording node's answer.
pub const RECORD_ACK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("the recording node {0} is not connected to this node")]
    NoPipe(NodeId),
    #[error("the recording node refused the record: {0}")]
    Refused(String),
    #[error("the recording node did not answer within {} s", RECORD_ACK_WAIT.as_secs())]
    Timeout,
    #[error("the pipe to the recording node closed before it answered")]
    Lost,
    #[error("the mesh has stopped")]
    Stopped,
}

/// A session that must end because its recording failed, and why (see
/// [`crate::compliance::recorder::Ended`]).
pub type Ended = crate::compliance::recorder::Ended;

/// What the mesh does with records: where records relayed here go (`None`: this node does
/// not record, and says so), and where endings of sessions other nodes record are told.
#[derive(Default)]
pub struct Wiring {
    pub inbox: Option<mpsc::UnboundedSender<Inbound>>,
    pub ended: Option<tokio::sync::broadcast::Sender<Ended>>,
}

/// What reaches the recording node's side.
#[derive(Debug)]
pub enum Inbound {
    Record(RelayedRecord),
    /// The pipe to this node closed: its participants' records end here.
    NodeGone(NodeId),
}

/// A record another node sent for a session this node records.
#[derive(Debug)]
pub struct RelayedRecord {
    pub from_node: NodeId,
    pub from_region: RegionId,
    pub session: SessionId,
    pub entry: RecordEntry,
    /// Where the answer goes.
    pub pipe: PipeId,
    pub id: u64,
}

/// Sends records to other nodes and answers the ones received (cheap to clone).
#[derive(Clone)]
pub struct RecordRelay {
    pub(super) tx: mpsc::UnboundedSender<Internal>,
}

impl RecordRelay {
    /// Sends `entry` to `node` and waits until it is on that node's disk.
    pub async fn send(
        &self,
        node: &NodeId,
        session: &SessionId,
        entry: RecordEntry,
    ) -> Result<(), RelayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Internal::Record {
                node: node.clone(),
                session: session.clone(),
                entry,
                reply: Some(reply),
            })
            .map_err(|_| RelayError::Stopped)?;
        match tokio::time::timeout(RECORD_ACK_WAIT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RelayError::Stopped),
            Err(_) => Err(RelayError::Timeout),
        }
    }

    /// Sends `entry` to `node` without waiting (a departure, a producer change: the
    /// recording node writes them in the order sent).
    pub fn post(&self, node: &NodeId, session: &SessionId, entry: RecordEntry) {
        let _ = self.tx.send(Internal::Record {
            node: node.clone(),
            session: session.clone(),
            entry,
            reply: None,
        });
    }

    /// Tells `node` that `session`, recorded here, has ended because its recording failed.
    pub fn end(&self, node: &NodeId, session: &SessionId, reason: &str) {
        let _ = self.tx.send(Internal::RecordingEnded {
            node: node.clone(),
            session: session.clone(),
            reason: reason.to_owned(),
        });
    }

    /// Answers a record received: written (`error` absent), or why not.
    pub fn answer(&self, pipe: PipeId, id: u64, error: Option<String>) {
        let _ = self.tx.send(Internal::RecordAck { pipe, id, error });
    }
}
