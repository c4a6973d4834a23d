//! The command line's subcommands (`logs`, `exec`: [`commands`]; `exec -it`'s terminal: [`term`]) and kubectl-like text output
//! (`get pods`, `describe pod`: [`render`]).

pub mod commands;
pub mod render;
pub mod term;
