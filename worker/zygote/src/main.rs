use clap::Parser;
use pyrunner_zygote::Args;

fn main() -> std::process::ExitCode {
    pyrunner_zygote::run(&Args::parse())
}
