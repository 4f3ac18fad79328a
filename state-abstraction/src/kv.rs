//! Tiny key-value service for the simulator.
