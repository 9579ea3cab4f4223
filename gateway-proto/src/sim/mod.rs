//! Test-only simulators every state machine's tests share, in virtual time:
//! [`rendezvous`] (a rendezvous server and a driver that sorts its outputs as the
//! gateway's service loop does), [`agents`] (agents, modelled NATs and a
//! simulated gateway with the real rendezvous and TURN cores) and [`cluster`]
//! (several rendezvous servers joined by an in-memory cluster store).
pub(crate) mod agents;
pub(crate) mod cluster;
pub(crate) mod rendezvous;
