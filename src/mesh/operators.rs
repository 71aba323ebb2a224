//! Operators' calls crossing the mesh (see [`crate::proto::admin`]): the node whose admin API
//! received a call for another node sends it over their pipe and waits for the answer; calls
//! arriving from peers go to this node's admin side, which answers them as its own API would.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Internal;
use crate::ids::NodeId;
use crate::proto::admin::{AdminCall, AdminReply};

/// Longest a relayed call waits for the far node's answer.
pub const ADMIN_WAIT: Duration = Duration::from_secs(5);

/// Calls from peers carried out here at once; more are refused until some finish.
pub const MAX_IN_FLIGHT: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminRelayError {
    #[error("{0} is not connected to this node (not a member, or its pipe is down)")]
    NoPipe(NodeId),
    #[error("{0} did not answer within {secs} s", secs = ADMIN_WAIT.as_secs())]
    Timeout(NodeId),
    #[error("the pipe to {0} closed before it answered")]
    Lost(NodeId),
    #[error("the mesh has stopped")]
    Stopped,
}

/// A call another node relayed here, and where its answer goes.
#[derive(Debug)]
pub struct Inbound {
    /// The relaying node (proven by its pipe certificate).
    pub from: NodeId,
    pub call: AdminCall,
    pub reply: oneshot::Sender<AdminReply>,
}

/// Sends operators' calls to other nodes (cheap to clone).
#[derive(Clone)]
pub struct AdminRelay {
    pub(super) tx: mpsc::UnboundedSender<Internal>,
}

impl AdminRelay {
    /// Carries `call` to `node` and returns its answer.
    pub async fn call(
        &self,
        node: &NodeId,
        call: AdminCall,
    ) -> Result<AdminReply, AdminRelayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Internal::Admin {
                node: node.clone(),
                call,
                reply,
            })
            .map_err(|_| AdminRelayError::Stopped)?;
        match tokio::time::timeout(ADMIN_WAIT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AdminRelayError::Lost(node.clone())),
            Err(_) => Err(AdminRelayError::Timeout(node.clone())),
        }
    }
}
