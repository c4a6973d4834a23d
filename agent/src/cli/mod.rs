//! The command line's subcommands (`logs`, `exec`: [`commands`]) and kubectl-like text output
//! (`get pods`, `describe pod`: [`render`]).

pub mod commands;
pub mod render;
