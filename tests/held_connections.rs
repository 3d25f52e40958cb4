//! Opens N connections to one server and holds them all open at once, then sends `GET /<i>` on
//! connection i and checks the answer is `page <i>`: proves N concurrent proxied connections, each
//! reaching the right place. Prints `connected N` once all are open and waits for a line on stdin
//! before requesting (so a test can look at the agents meanwhile), then `ok N`.
//!
//! held-connections <ip:port> <n>
use std::io::BufRead;

use anyhow::{bail, ensure, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, n] = args.as_slice() else {
        bail!("usage: held-connections <ip:port> <n>");
    };
    let n: usize = n.parse().context("n")?;
    let mut connections = Vec::with_capacity(n);
    for i in 1..=n {
        let stream = TcpStream::connect(addr.as_str())
            .await
            .with_context(|| format!("connection {i}"))?;
        connections.push(stream);
    }
    println!("connected {n}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let mut requests = tokio::task::JoinSet::new();
    for (i, mut stream) in connections.into_iter().enumerate() {
        requests.spawn(async move {
            let page = i + 1;
            stream
                .write_all(format!("GET /{page} HTTP/1.0\r\nHost: held\r\n\r\n").as_bytes())
                .await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            let expected = format!("page {page}\n");
            ensure!(
                reply.starts_with("HTTP/1.1 200") && reply.ends_with(&expected),
                "connection {page} got {reply:?}"
            );
            Ok(())
        });
    }
    while let Some(result) = requests.join_next().await {
        result.context("a request task panicked")??;
    }
    println!("ok {n}");
    Ok(())
}
