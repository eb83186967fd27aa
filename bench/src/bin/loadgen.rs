//! `loadgen`: drives one scenario against one WebSocket server and prints a report.
//!
//! ```text
//! loadgen echo --addr 127.0.0.1:9101 --dialect raw -n 100 -k 1 --duration 5 --server-pid 1234
//! loadgen fanout --addr 127.0.0.1:9000 --dialect plexus -m 1000 --rate 100 --json out.json
//! ```
//! See bench/README.md for every scenario.

use clap::Parser;
use plexus_bench::args::{Cli, Scenario};
use plexus_bench::{limits, scenarios, timeline};

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let common = cli.scenario.common().clone();
    timeline::base();

    let sockets = match &cli.scenario {
        Scenario::Echo(a) => a.connections,
        Scenario::Fanout(a) => a.members + 1,
        Scenario::ConnectStorm(a) => a.target,
        Scenario::IdleMemory(a) => a.connections,
        Scenario::Hotswap(a) => a.connections,
    } as u64;
    let want = sockets + 1024;
    let got = limits::raise_nofile(want);
    if got < want {
        eprintln!("loadgen: open-file limit is {got}, below the {want} this run needs");
    }

    let threads = common.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        match &cli.scenario {
            Scenario::Echo(a) => scenarios::echo::run(a, threads).await,
            Scenario::Fanout(a) => scenarios::fanout::run(a, threads).await,
            Scenario::ConnectStorm(a) => scenarios::storm::run(a, threads).await,
            Scenario::IdleMemory(a) => scenarios::idle::run(a, threads).await,
            Scenario::Hotswap(a) => scenarios::hotswap::run(a, threads).await,
        }
    })?;
    // Connections still closing in the background are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));

    if let Some(path) = &common.json {
        report.write_json(path)?;
    }
    if common.quiet {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
