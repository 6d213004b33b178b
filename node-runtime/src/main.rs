use std::process::ExitCode;

fn main() -> ExitCode {
    unfed_node::engine::fix_thread_count();
    unfed_node::cli::main_from(std::env::args_os())
}
