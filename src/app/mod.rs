//! The commands: the command line (`cli`, the only user of clap besides the argument structs of
//! `quickstart` and `bench`), the settings of a run, training and evaluation runs, the built-in
//! demo and the bench. Nothing below `app/` imports it.

pub mod bench;
pub mod cli;
pub mod compare;
pub mod device_check;
pub mod import_official;
pub mod loadtest;
pub mod products;
pub mod quickstart;
pub mod run;
pub mod serve;
pub mod settings;
