//! The TCP backend: the shared collective suite over real sockets (ranks as threads of this test,
//! each with its own store client and socket mesh), a multi-process run through `init()`, and a
//! stranger on the transport port.
mod common;

use ferroccl::prelude::*;
use ferroccl::rendezvous::{StoreClient, StoreServer};
use ferroccl::tcp::TcpComm;
use ferroccl::Config;
use std::sync::Arc;
use std::time::Duration;

fn mesh<T: Send>(n: usize, f: impl Fn(&TcpComm) -> Result<T> + Sync) -> Vec<T> {
    let server = StoreServer::bind("127.0.0.1:0", "s3cret").unwrap();
    let addr = server.local_addr().to_string();
    let server = Arc::new(Some(server));
    let cfg = Config::default().with_timeout(Duration::from_secs(60));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, server, cfg, f) = (addr.clone(), server.clone(), cfg.clone(), &f);
                s.spawn(move || {
                    let store = Arc::new(StoreClient::connect(
                        &addr,
                        "s3cret",
                        Duration::from_secs(10),
                    )?);
                    let c = TcpComm::connect(store, server, &addr, "t", r, n, "s3cret", cfg)?;
                    f(&c)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

#[test]
fn every_collective_over_sockets() {
    let k = mesh(3, |c| {
        let mut k = 0;
        for n in [0usize, 1, 13, 1031] {
            k += common::suite::all_dtypes(c, n)?;
        }
        k += common::suite::collectives_t::<f32>(c, 100_003, &[ReduceOp::Sum, ReduceOp::Avg])?;
        Ok(k)
    });
    assert!(k.iter().all(|&k| k > 300), "{k:?}");
}

#[test]
fn split_over_sockets() {
    let out = mesh(4, |c| {
        let sub = c.split(Some((c.rank() / 2) as u32), 0)?.expect("member");
        let mut v = [c.rank() as i32];
        sub.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok((sub.rank(), sub.world_size(), v[0]))
    });
    assert_eq!(out, vec![(0, 2, 1), (1, 2, 1), (0, 2, 5), (1, 2, 5)]);
}

#[test]
fn processes_launched_torchrun_style_run_the_example() {
    // The allreduce example through init(): 3 processes, env rendezvous, TCP transport.
    let exe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let bin = ["release", "debug"]
        .iter()
        .map(|p| exe.join(p).join("examples").join("allreduce"))
        .find(|p| p.exists());
    let Some(bin) = bin else {
        eprintln!("skipping: build the allreduce example first (cargo build --example allreduce)");
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kids: Vec<_> = (0..3)
        .map(|r| {
            std::process::Command::new(&bin)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("FERROCCL_TOKEN", "tok")
                .env("FERROCCL_TIMEOUT", "60")
                .env_remove("FERROCCL_BACKEND")
                .env_remove("OMPI_COMM_WORLD_SIZE")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
    let s = String::from_utf8_lossy(&outs[0].stdout);
    assert!(
        s.contains(r#""backend":"tcp""#) && s.contains(r#""ok":true"#),
        "{s}"
    );
}
