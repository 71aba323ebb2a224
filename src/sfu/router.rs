//! Routers: one session's forwarding domain on this worker. Participants join and leave,
//! the session's members (here and on other nodes) hear of each other, and the last one
//! leaving ends the session here.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::keys::{ConnKey, ConsumerKey, ParticipantKey, ProducerKey};
use super::worker::*;
use super::*;

/// Longest a join to a session new here waits for other nodes to replay the session.
pub(super) const MESH_REPLAY_WAIT: Duration = Duration::from_millis(500);

/// Joins waiting for the mesh: participant, reply, answer-by.
pub(super) type AwaitingMesh = Vec<(
    ParticipantId,
    oneshot::Sender<Result<Joined, JoinError>>,
    Instant,
)>;

pub(super) struct Participant {
    pub(super) id: ParticipantId,
    pub(super) session: SessionId,
    pub(super) user: UserId,
    pub(super) role: Role,
    pub(super) events: EventSender,
    /// Where a dismissal for not reading events is counted.
    pub(super) stats: Arc<WorkerStats>,
    /// Joined a session new here and waits for the mesh's replay of it: events are held
    /// back, since `joined` will describe the session as it is then.
    pub(super) syncing: bool,
    pub(super) publish: Option<ConnKey>,
    pub(super) subscribe: Option<ConnKey>,
    pub(super) producers: Vec<ProducerKey>,
    pub(super) consumers: Vec<ConsumerKey>,
}

impl Participant {
    pub(super) fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            participant_id: self.id.clone(),
            user_id: self.user.clone(),
            role: self.role,
        }
    }
    pub(super) fn send(&self, ev: SfuEvent) {
        // Until its `joined` is answered, what happens is part of that answer.
        if self.syncing {
            return;
        }
        if !self.events.send(ev) {
            self.stats.events_overflowed.fetch_add(1, Relaxed);
            tracing::info!(participant = %self.id, "dismissing a participant whose connection stopped reading events");
        }
    }
}

impl Worker {
    pub(super) fn join(
        &mut self,
        session: SessionId,
        user: UserId,
        role: Role,
        recorded: bool,
        events: EventSender,
    ) -> Result<ParticipantKey, JoinError> {
        // One live connection per user and session: the newest replaces the older, so a
        // user who reconnects is never locked out by their own stale seat.
        let stale: Vec<ParticipantId> = self
            .routers
            .get(&session)
            .into_iter()
            .flatten()
            .map(|&o| &self.participants[o])
            .filter(|o| o.user == user)
            .map(|o| o.id.clone())
            .collect();
        for old in stale {
            if let Some(&ok) = self.participant_ids.get(&old) {
                self.participants[ok].events.dismiss(Dismissal::Replaced);
            }
            self.stats.participants_replaced.fetch_add(1, Relaxed);
            tracing::info!(participant = %old, "replaced by a newer connection of the same user");
            self.leave(&old);
        }
        let limits = &self.cfg.limits;
        match self.routers.get(&session) {
            None if self.routers.len() >= limits.max_sessions => {
                return Err(JoinError::TooManySessions)
            }
            Some(members) if members.len() >= limits.max_participants_per_session => {
                return Err(JoinError::SessionFull(limits.max_participants_per_session))
            }
            _ => {}
        }
        let id = ParticipantId::random();
        // A session new here, on a node in a mesh (or one still waiting for it): the
        // participant's view waits for the mesh's replay.
        let syncing = self.meshed
            && (!self.routers.contains_key(&session) || self.awaiting_mesh.contains_key(&session));
        let pk = self.participants.insert(Participant {
            id: id.clone(),
            session: session.clone(),
            user,
            role,
            events,
            stats: self.stats.clone(),
            syncing,
            publish: None,
            subscribe: None,
            producers: Vec::new(),
            consumers: Vec::new(),
        });
        self.participant_ids.insert(id.clone(), pk);
        if recorded && self.cfg.recording.is_some() {
            // Producers piped in before this join are recorded from now on.
            self.record_session(&session);
        }
        if !self.routers.contains_key(&session) {
            // Other nodes announce this session's producers from now on.
            self.mesh_event(MeshEvent::SessionActive(session.clone()));
        }
        let members = self.routers.entry(session.clone()).or_default();
        let others: Vec<ParticipantKey> = members.clone();
        members.push(pk);
        let me = self.participants[pk].info();
        for &o in &others {
            let other = &self.participants[o];
            if other.role.may_see(role) {
                other.send(SfuEvent::ParticipantJoined(me.clone()));
            }
        }
        self.mesh_event(MeshEvent::ParticipantJoined {
            session: session.clone(),
            participant: me,
        });
        self.update_gauges();
        tracing::info!(participant = %id, ?role, "participant joined");
        Ok(pk)
    }

    /// The session as participant `pk` may see it now: the others here and on other nodes,
    /// and the producers its role may see.
    pub(super) fn joined(&self, pk: ParticipantKey) -> Joined {
        let me = &self.participants[pk];
        let role = me.role;
        // Participants are shown by the same rule as their media: users see agents only.
        let mut participants: Vec<ParticipantInfo> = self
            .routers
            .get(&me.session)
            .into_iter()
            .flatten()
            .filter(|&&o| o != pk)
            .map(|&o| &self.participants[o])
            .filter(|o| role.may_see(o.role))
            .map(|o| o.info())
            .collect();
        participants.extend(
            self.remote_participants
                .get(&me.session)
                .into_iter()
                .flatten()
                .filter(|(_, p)| role.may_see(p.role))
                .map(|(_, p)| p.clone()),
        );
        let producers = self
            .session_producers
            .get(&me.session)
            .into_iter()
            .flatten()
            .filter(|&&prk| role.may_see(self.producers[prk].owner.role))
            .map(|&prk| self.producer_info(prk))
            .collect();
        Joined {
            participant_id: me.id.clone(),
            participants,
            producers,
        }
    }

    /// Answers a join that waited for the mesh, and lets events flow to it from now on.
    pub(super) fn answer_join(
        &mut self,
        id: &ParticipantId,
        reply: oneshot::Sender<Result<Joined, JoinError>>,
    ) {
        let Some(&pk) = self.participant_ids.get(id) else {
            return; // it left while waiting
        };
        let p = &mut self.participants[pk];
        p.syncing = false;
        let _ = reply.send(Ok(self.joined(pk)));
    }

    pub(super) fn hosts_session(&self, session: &SessionId) -> bool {
        self.routers.contains_key(session)
    }

    /// Tells every member of `session` here allowed to see `who` that it joined or left.
    pub(super) fn notify_presence(&self, session: &SessionId, who: &ParticipantInfo, joined: bool) {
        if let Some(members) = self.routers.get(session) {
            for &o in members {
                let p = &self.participants[o];
                if p.role.may_see(who.role) {
                    p.send(if joined {
                        SfuEvent::ParticipantJoined(who.clone())
                    } else {
                        SfuEvent::ParticipantLeft(who.clone())
                    });
                }
            }
        }
    }

    /// Sends an event about media published with `role` to every member of `session` here
    /// allowed to see it, except the publisher itself.
    pub(super) fn notify_session(
        &self,
        session: &SessionId,
        role: Role,
        except: Option<ParticipantKey>,
        ev: SfuEvent,
    ) {
        if let Some(members) = self.routers.get(session) {
            for &o in members {
                if Some(o) != except && self.participants[o].role.may_see(role) {
                    self.participants[o].send(ev.clone());
                }
            }
        }
    }

    pub(super) fn leave(&mut self, participant: &ParticipantId) {
        let Some(pk) = self.participant_ids.remove(participant) else {
            return;
        };
        let producers = self.participants[pk].producers.clone();
        for prk in producers {
            self.close_producer(prk);
        }
        let consumers = self.participants[pk].consumers.clone();
        for cid in consumers {
            self.close_consumer(cid, false);
        }
        let p = &self.participants[pk];
        let conns: Vec<ConnKey> = p.publish.into_iter().chain(p.subscribe).collect();
        for ck in conns {
            self.close_conn(ck);
        }
        let p = self.participants.remove(pk);
        self.mesh_event(MeshEvent::ParticipantLeft {
            session: p.session.clone(),
            participant: p.info(),
        });
        if let Some(members) = self.routers.get_mut(&p.session) {
            members.retain(|&x| x != pk);
            self.notify_presence(&p.session, &p.info(), false);
            self.end_if_empty(&p.session);
        }
        tracing::info!(participant = %p.id, "participant left");
        self.update_gauges();
    }

    /// Ends the session here when no participant and no recording seat holds it.
    pub(super) fn end_if_empty(&mut self, session: &SessionId) {
        let empty = self.routers.get(session).is_some_and(|m| m.is_empty());
        if !empty || self.record_seats.contains(session) {
            return;
        }
        self.routers.remove(session);
        self.recorded.remove(session);
        // Producers piped in for this session have no audience left here.
        for prk in self.producers_of(session) {
            self.close_producer(prk);
        }
        self.remote_participants.remove(session);
        self.mesh_event(MeshEvent::SessionInactive(session.clone()));
    }

    /// The session's producers here (published here and piped in).
    pub(super) fn producers_of(&self, session: &SessionId) -> Vec<ProducerKey> {
        self.session_producers
            .get(session)
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn update_gauges(&self) {
        let s = &self.stats;
        s.sessions.store(self.routers.len() as u64, Relaxed);
        s.participants
            .store(self.participants.len() as u64, Relaxed);
        s.producers.store(self.producers.len() as u64, Relaxed);
        s.consumers.store(self.consumers.len() as u64, Relaxed);
        s.peer_connections.store(self.conns.len() as u64, Relaxed);
    }
}

impl Worker {
    /// The session's participants here, the producers this worker forwards (published here
    /// or piped in) and its participants' consumers; `None` if the session is not here.
    pub(super) fn describe(&self, session: &SessionId) -> Option<SessionView> {
        use crate::proto::admin::{ConsumerPart, ParticipantPart, ProducerPart};
        let members = self.routers.get(session);
        let producers = self.session_producers.get(session);
        if members.is_none() && producers.is_none() {
            return None;
        }
        let node_of = |pipe: &PipeId| self.pipes.get(pipe).map(|p| p.node.clone());
        let here: Vec<&Participant> = members
            .into_iter()
            .flatten()
            .filter_map(|&pk| self.participants.get(pk))
            .collect();
        let participants = here
            .iter()
            .map(|p| ParticipantPart {
                participant: p.id.clone(),
                user: p.user.clone(),
                role: p.role,
                publishing: p.publish.is_some(),
                subscribing: p.subscribe.is_some(),
            })
            .collect();
        let producers = producers
            .into_iter()
            .flatten()
            .filter_map(|&k| self.producers.get(k))
            .map(|p| ProducerPart {
                producer: p.id.clone(),
                participant: p.owner.participant_id.clone(),
                user: p.owner.user_id.clone(),
                kind: match p.kind {
                    MediaKind::Audio => "audio",
                    MediaKind::Video => "video",
                }
                .into(),
                rids: p.rids.clone(),
                paused: p.paused,
                piped_from: match &p.origin {
                    super::producer::Origin::Pipe { pipe, .. } => node_of(pipe),
                    super::producer::Origin::Local { .. } => None,
                },
                piped_to: p
                    .pipes_out
                    .iter()
                    .filter(|(_, layers)| *layers != 0)
                    .filter_map(|(pipe, _)| node_of(pipe))
                    .collect(),
                consumers: p.consumers.len() as u32,
            })
            .collect();
        let consumers = here
            .iter()
            .flat_map(|p| {
                p.consumers.iter().filter_map(|&ck| {
                    let c = self.consumers.get(ck)?;
                    Some(ConsumerPart {
                        consumer: c.id.clone(),
                        producer: self.producers.get(c.producer)?.id.clone(),
                        participant: p.id.clone(),
                        paused: c.paused,
                        layer: c.selector.current(),
                    })
                })
            })
            .collect();
        Some(SessionView {
            participants,
            producers,
            consumers,
            recorded: self.recorded.contains(session),
        })
    }
}
