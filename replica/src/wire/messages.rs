//! Messages: one enum per protocol (client, agreement, view change, state transfer) and the
//! [`Message`] that carries any of them.

use super::codec::byte_string;
use super::{
    Checkpoint, CheckpointCertificate, Commit, CommitCertificate, Digest, NewView, Pom, Prepare,
    Proposal, Reply, Request, SeqNo, Signed, SpecResponse, View, ViewChange,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    Request(Signed<Request>),
    Reply(Reply),
    SpecResponse(Box<SpecResponse>),
    /// From a client that saw the primary equivocate, to every replica.
    Pom(Box<Pom>),
    /// Sent by a client when it connects to a replica, so the replica's driver knows the
    /// connection to send this client's replies on before any request arrives there (an
    /// ordered request goes to the primary only, but every replica replies). The core
    /// ignores it.
    Hello,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgreementMessage {
    PrePrepare(Proposal),
    Prepare(Signed<Prepare>),
    Commit(Signed<Commit>),
    Checkpoint(Signed<Checkpoint>),
    /// Asks for commit certificates of sequence numbers `from..=to` (a replica that fell behind).
    FetchCommitted {
        from: SeqNo,
        to: SeqNo,
    },
    /// Answer to `FetchCommitted`.
    Committed(Box<CommitCertificate>),
    /// Asks for the current view's proposals `from..=to` (a hole below proposals this
    /// replica holds): first the primary, then everyone.
    FillHole {
        view: View,
        from: SeqNo,
        to: SeqNo,
    },
    /// Answer to `FillHole`: a proposal signed by its view's primary, relayed by anyone.
    Filled(Box<Proposal>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewChangeMessage {
    ViewChange(Signed<ViewChange>),
    NewView(Signed<NewView>),
    /// Asks for the new-view message that installed the sender's current view (sent by a
    /// replica that sees traffic from a view it never entered).
    QueryNewView {
        view: View,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateTransferMessage {
    /// Asks for the sender's newest stable checkpoint certificate.
    QueryStable,
    ReplyStable(CheckpointCertificate),
    /// Asks for partition-tree node `(level, index)` at checkpoint `seq`.
    GetNode {
        seq: SeqNo,
        level: u32,
        index: u64,
    },
    /// `object_count` is meaningful at the root only (it enters the root digest).
    Node {
        seq: SeqNo,
        level: u32,
        index: u64,
        object_count: u64,
        children: Vec<Digest>,
    },
    GetPieceDigests {
        seq: SeqNo,
        index: u64,
    },
    PieceDigests {
        seq: SeqNo,
        index: u64,
        digests: Vec<Digest>,
    },
    GetPiece {
        seq: SeqNo,
        index: u64,
        piece: u32,
    },
    Piece {
        seq: SeqNo,
        index: u64,
        piece: u32,
        #[serde(with = "byte_string")]
        bytes: Vec<u8>,
    },
    /// Asks for the reply cache as of checkpoint `seq`.
    GetReplies {
        seq: SeqNo,
    },
    Replies {
        seq: SeqNo,
        #[serde(with = "byte_string")]
        table: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Client(ClientMessage),
    Agreement(AgreementMessage),
    ViewChange(ViewChangeMessage),
    StateTransfer(StateTransferMessage),
    /// Zzyzx's log protocol (holder ↔ log servers, and between servers).
    Lock(super::LockMessage),
}

impl Message {
    /// Short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Client(ClientMessage::Request(_)) => "request",
            Message::Client(ClientMessage::Reply(_)) => "reply",
            Message::Client(ClientMessage::Hello) => "hello",
            Message::Client(ClientMessage::SpecResponse(_)) => "spec_response",
            Message::Client(ClientMessage::Pom(_)) => "pom",
            Message::Agreement(AgreementMessage::FillHole { .. }) => "fill_hole",
            Message::Agreement(AgreementMessage::Filled(_)) => "filled",
            Message::Agreement(AgreementMessage::PrePrepare(_)) => "pre_prepare",
            Message::Agreement(AgreementMessage::Prepare(_)) => "prepare",
            Message::Agreement(AgreementMessage::Commit(_)) => "commit",
            Message::Agreement(AgreementMessage::Checkpoint(_)) => "checkpoint",
            Message::Agreement(AgreementMessage::FetchCommitted { .. }) => "fetch_committed",
            Message::Agreement(AgreementMessage::Committed(_)) => "committed",
            Message::ViewChange(ViewChangeMessage::ViewChange(_)) => "view_change",
            Message::ViewChange(ViewChangeMessage::NewView(_)) => "new_view",
            Message::ViewChange(ViewChangeMessage::QueryNewView { .. }) => "query_new_view",
            Message::StateTransfer(_) => "state_transfer",
            Message::Lock(m) => m.kind(),
        }
    }
}
