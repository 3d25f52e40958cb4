//! A hostile or misconfigured tunnel client for the lab tests: talks to an agent's tunnel port with
//! whatever certificate it is given, or with bytes that are not TLS at all, and prints what
//! happened on stdout (`outcome: ...` lines) so a test can assert on it.
//!
//! tunnel-probe <ip:port> connect <authority> --cert C --key K [--forwarded IP] [--header-bytes N]
//! tunnel-probe <ip:port> garbage
//! tunnel-probe <ip:port> truncated-hello
use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use http_body_util::Empty;
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(mode)) = (args.first(), args.get(1)) else {
        bail!("usage: tunnel-probe <ip:port> connect|garbage|truncated-hello ...");
    };
    let outcome = tokio::time::timeout(TIMEOUT, async {
        match mode.as_str() {
            "connect" => connect(addr, &args[2..]).await,
            "garbage" => raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage").await,
            // The first bytes of a TLS 1.3 ClientHello record, cut off.
            "truncated-hello" => raw(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01]).await,
            other => bail!("unknown mode {other}"),
        }
    })
    .await
    .unwrap_or_else(|_| Ok("timed out".into()))?;
    println!("outcome: {outcome}");
    Ok(())
}

/// Sends `bytes`, half-closes, and reports how the agent ended the connection.
async fn raw(addr: &str, bytes: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    Ok(match stream.read_to_end(&mut reply).await {
        Ok(_) if reply.starts_with(&[0x15]) => "closed with a TLS alert".into(),
        Ok(_) => format!("closed after {} bytes", reply.len()),
        Err(err) => format!("closed: {err}"),
    })
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// mTLS + HTTP/2 CONNECT to `authority`, then an HTTP/1.0 GET through the stream.
async fn connect(addr: &str, args: &[String]) -> Result<String> {
    let authority = args.first().context("connect needs an authority")?;
    let cert = flag(args, "--cert").context("--cert")?;
    let key = flag(args, "--key").context("--key")?;
    let chain: Vec<CertificateDer> =
        CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from("probe.invalid")?;
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(err) => return Ok(format!("handshake failed: {err}")),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
        {
            Ok(pair) => pair,
            Err(err) => return Ok(format!("handshake failed: {err}")),
        };
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str());
    if let Some(ip) = flag(args, "--forwarded") {
        request = request.header("forwarded", format!("for={ip}"));
    }
    if let Some(bytes) = flag(args, "--header-bytes") {
        request = request.header("x-padding", "p".repeat(bytes.parse()?));
    }
    let response = match sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await
    {
        Ok(response) => response,
        Err(err) => return Ok(format!("stream failed: {err}")),
    };
    if !response.status().is_success() {
        return Ok(format!("status {}", response.status().as_u16()));
    }
    let mut stream = TokioIo::new(hyper::upgrade::on(response).await?);
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
        .await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    Ok(format!(
        "reached the app: {}",
        reply.lines().next().unwrap_or("")
    ))
}

/// The probe checks the agent, not the other way round: any server certificate is accepted.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
