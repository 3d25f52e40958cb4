//! Workload identities and their certificates. The agent holds, in memory only, one short-lived
//! X.509 certificate per SPIFFE identity of the pods on its node, issued from the mesh CA and
//! renewed well before it expires, and builds the rustls configs (TLS 1.3, mutual authentication)
//! that node agents use between each other.
use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    fmt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        Resumption,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{
        pem::{PemObject, SectionKind},
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
    },
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier},
    sign::{CertifiedKey, SingleCertAndKey},
    CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme,
};
use serde::{Serialize, Serializer};
use tracing::{debug, info, warn};
use x509_parser::extensions::GeneralName;

use crate::lock;

/// Backdating of `not_before`, so a peer whose clock is slightly behind still accepts a fresh
/// certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The only application protocol spoken inside the tunnels.
const ALPN_H2: &[u8] = b"h2";

/// The SPIFFE specification's limit on the length of a SPIFFE ID.
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The SPIFFE specification's limit on the length of a trust domain.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Infallible because callers pass Kubernetes names, which are always valid SPIFFE path
    /// segments. An identity that is not valid anyway never gets a certificate: issuing refuses it.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses a SPIFFE ID strictly: lowercase `spiffe://` scheme, a trust domain of the SPIFFE
    /// alphabet (no port, user info, query or fragment) and a path of exactly
    /// `/ns/<namespace>/sa/<service-account>`, each segment non-empty and not percent-encoded.
    pub fn parse(uri: &str) -> Result<Self> {
        parse_spiffe_id(uri).map_err(|reason| anyhow!("invalid SPIFFE ID {uri:?}: {reason}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn parse_spiffe_id(uri: &str) -> Result<Identity, String> {
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!("longer than {MAX_SPIFFE_ID_LEN} bytes"));
    }
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or("the scheme must be spiffe://")?;
    let (trust_domain, path) = rest
        .split_once('/')
        .ok_or("no path; expected /ns/<namespace>/sa/<service-account>")?;
    if trust_domain.is_empty() {
        return Err("empty trust domain".into());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "trust domain longer than {MAX_TRUST_DOMAIN_LEN} bytes"
        ));
    }
    // The SPIFFE trust-domain alphabet; it leaves no room for a port, user info or uppercase.
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(format!(
            "trust domain {trust_domain:?} may only hold lowercase letters, digits, '.', '-' and '_'"
        ));
    }
    let segments: Vec<&str> = path.split('/').collect();
    let ["ns", namespace, "sa", service_account] = segments.as_slice() else {
        return Err("the path must be exactly /ns/<namespace>/sa/<service-account>".into());
    };
    check_path_segment("namespace", namespace)?;
    check_path_segment("service account", service_account)?;
    Ok(Identity::new(trust_domain, namespace, service_account))
}

/// The SPIFFE path-segment alphabet, which also rules out queries, fragments and percent-encoding.
fn check_path_segment(what: &str, segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("empty {what}"));
    }
    if segment == "." || segment == ".." {
        return Err(format!("{what} must not be {segment:?}"));
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(format!(
            "{what} {segment:?} may only hold letters, digits, '.', '-' and '_'"
        ));
    }
    Ok(())
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The mesh CA: the trust anchor of every handshake and the issuer of every workload certificate.
pub struct MeshCa {
    /// The certificate exactly as loaded: the second element of every chain weft presents.
    cert_der: CertificateDer<'static>,
    anchor: TrustAnchor<'static>,
    /// rcgen's view of the CA (subject, key identifier), which it needs to sign as this issuer.
    issuer: rcgen::Certificate,
    key: KeyPair,
    subject: String,
    /// Unix seconds; no workload certificate outlives the CA, peers would reject it anyway.
    not_after: u64,
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("subject", &self.subject)
            .field("not_after", &rfc3339_unix(self.not_after))
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Loads and checks the CA: clear errors (naming the file) when a file is missing, is not PEM,
    /// holds no certificate / no key, the cert is not a CA (basicConstraints cA must be true;
    /// keyCertSign key usage if key usage is present), is expired or not yet valid, or the key does
    /// not belong to the certificate. The key must be PKCS#8 (`BEGIN PRIVATE KEY`).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let cert_file = format!("mesh CA certificate {}", cert_path.display());
        let key_file = format!("mesh CA key {}", key_path.display());

        let sections = read_pem(cert_path, &cert_file)?;
        let mut certs = sections
            .into_iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der));
        let cert_der = certs
            .next()
            .with_context(|| format!("{cert_file} holds no certificate (no BEGIN CERTIFICATE)"))?;
        let ignored = certs.count();
        if ignored > 0 {
            warn!("{cert_file}: using the first certificate, ignoring {ignored} more");
        }
        let key = read_ca_key(key_path, &key_file)?;

        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| anyhow!("{cert_file} is not a valid X.509 certificate: {e}"))?;
        let subject = x509.subject().to_string();
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| anyhow!("{cert_file}: invalid basicConstraints: {e}"))?
            .is_some_and(|bc| bc.value.ca);
        ensure!(
            is_ca,
            "{cert_file} ({subject}) is not a CA certificate: basicConstraints cA is not true"
        );
        let key_usage = x509
            .key_usage()
            .map_err(|e| anyhow!("{cert_file}: invalid keyUsage: {e}"))?;
        if let Some(key_usage) = key_usage {
            ensure!(
                key_usage.value.key_cert_sign(),
                "{cert_file} ({subject}) may not sign certificates: its keyUsage lacks keyCertSign"
            );
        }
        let now = unix_now()?;
        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();
        ensure!(
            i64::try_from(now).is_ok_and(|now| now >= not_before),
            "{cert_file} ({subject}) is not yet valid: not before {}",
            rfc3339_unix_signed(not_before)
        );
        let not_after = u64::try_from(not_after)
            .ok()
            .filter(|not_after| *not_after > now)
            .with_context(|| {
                format!(
                    "{cert_file} ({subject}) has expired: not after {}",
                    rfc3339_unix_signed(not_after)
                )
            })?;
        ensure!(
            key.public_key_der() == x509.public_key().raw,
            "{key_file} does not belong to {cert_file}: their public keys differ"
        );

        let issuer = CertificateParams::from_ca_cert_der(&cert_der)
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| anyhow!("{cert_file}: cannot issue certificates as this CA: {e}"))?;
        let anchor = webpki::anchor_from_trusted_cert(&cert_der)
            .map_err(|e| anyhow!("{cert_file} is not usable as a trust anchor: {e}"))?
            .to_owned();
        let ca = Self {
            cert_der,
            anchor,
            issuer,
            key,
            subject,
            not_after,
        };
        ca.self_check()
            .map_err(|e| anyhow!("{cert_file} fails its self-check: {e:#}"))?;
        info!(
            subject = %ca.subject,
            not_after = %rfc3339_unix(ca.not_after),
            "loaded the mesh CA"
        );
        Ok(ca)
    }

    /// Issues one certificate and verifies it like a peer would. rcgen re-encodes the CA's subject
    /// as the leaves' issuer; should that encoding differ from the certificate's (odd string
    /// types, repeated attributes), every handshake would fail, so fail here, at load, instead.
    fn self_check(&self) -> Result<()> {
        let provider = rustls::crypto::ring::default_provider();
        let probe = Identity::new("weft.invalid", "weft", "self-check");
        let issued = self.issue(&probe, CLOCK_SKEW, &provider)?;
        let leaf = issued.leaf()?;
        webpki::EndEntityCert::try_from(leaf)
            .and_then(|cert| {
                cert.verify_for_usage(
                    provider.signature_verification_algorithms.all,
                    std::slice::from_ref(&self.anchor),
                    &[],
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map(|_| ())
            })
            .map_err(|e| anyhow!("a certificate it issued does not verify against it: {e}"))?;
        let found = peer_identity(std::slice::from_ref(leaf))?;
        ensure!(found == probe, "issued {found} instead of {probe}");
        Ok(())
    }

    /// A fresh certificate for `id`, valid from `now - CLOCK_SKEW` for `lifetime` (less if the CA
    /// expires sooner).
    fn issue(
        &self,
        id: &Identity,
        lifetime: Duration,
        provider: &CryptoProvider,
    ) -> Result<WorkloadCertificate> {
        let uri = id.to_string();
        // Peers would fail to parse anything else back; refuse it here with the reason.
        Identity::parse(&uri).map_err(|e| anyhow!("refusing to issue a certificate: {e}"))?;

        let issued_at = SystemTime::now();
        let since_epoch = issued_at
            .duration_since(UNIX_EPOCH)
            .context("the system clock is before 1970")?;
        // X.509 times have whole seconds: round not_after down so the lifetime is never exceeded.
        let not_before = since_epoch.as_secs().saturating_sub(CLOCK_SKEW.as_secs());
        let not_after = (since_epoch + lifetime).as_secs().min(self.not_after);
        ensure!(
            not_after > since_epoch.as_secs(),
            "cannot issue a certificate for {id}: the mesh CA ({}) expired at {}",
            self.subject,
            rfc3339_unix(self.not_after)
        );

        let mut serial = [0u8; 16];
        provider
            .secure_random
            .fill(&mut serial)
            .map_err(|_| anyhow!("no randomness for a certificate serial"))?;
        // Positive (top bit clear) and without a leading zero byte, so DER keeps all 16 bytes and
        // the hex shown is the serial as encoded.
        serial[0] = (serial[0] & 0x7f) | 0x40;

        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a workload key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.custom_extensions = vec![uri_san_extension(&uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset_date_time(not_before)?;
        params.not_after = offset_date_time(not_after)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&leaf_key, &self.issuer, &self.key)
            .with_context(|| format!("signing the certificate of {id}"))?;

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = provider
            .key_provider
            .load_private_key(key_der)
            .context("loading a workload key into rustls")?;
        let certified_key =
            CertifiedKey::new(vec![cert.der().clone(), self.cert_der.clone()], signing_key);

        let not_after = UNIX_EPOCH + Duration::from_secs(not_after);
        Ok(WorkloadCertificate {
            identity: id.clone(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_before: UNIX_EPOCH + Duration::from_secs(not_before),
            not_after,
            certified_key: Arc::new(certified_key),
            issued_at,
            renew_at: issued_at,
        })
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<(SectionKind, Vec<u8>)>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {what}: {e}"))?;
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{what} is not valid PEM: {e}"))?;
    ensure!(
        !sections.is_empty(),
        "{what} is not PEM: it holds no -----BEGIN ...----- section"
    );
    Ok(sections)
}

fn read_ca_key(path: &Path, what: &str) -> Result<KeyPair> {
    let sections = read_pem(path, what)?;
    let pkcs8 = sections
        .iter()
        .find(|(kind, _)| *kind == SectionKind::PrivateKey)
        .map(|(_, der)| PrivatePkcs8KeyDer::from(der.as_slice()));
    let Some(pkcs8) = pkcs8 else {
        // rcgen signs with ring, which reads PKCS#8 only.
        if let Some((kind, _)) = sections.iter().find(|(kind, _)| {
            matches!(kind, SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey)
        }) {
            bail!(
                "{what} is a {} key; weft needs PKCS#8 (BEGIN PRIVATE KEY): convert it with \
                 `openssl pkcs8 -topk8 -nocrypt -in <key> -out <new key>`",
                if *kind == SectionKind::EcPrivateKey {
                    "SEC1 (BEGIN EC PRIVATE KEY)"
                } else {
                    "PKCS#1 (BEGIN RSA PRIVATE KEY)"
                }
            );
        }
        bail!("{what} holds no unencrypted private key (no BEGIN PRIVATE KEY)");
    };
    KeyPair::try_from(&pkcs8).map_err(|e| {
        anyhow!("{what} is not a usable private key (ECDSA P-256/P-384, Ed25519 or RSA): {e}")
    })
}

/// A subjectAltName holding exactly the one URI. Written by hand because rcgen marks the extension
/// non-critical, while RFC 5280 requires it critical when the subject is empty, as it is here.
fn uri_san_extension(uri: &str) -> CustomExtension {
    const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];
    const TAG_SEQUENCE: u8 = 0x30;
    const TAG_URI: u8 = 0x86; // [6] IMPLICIT IA5String
    let general_names = der_tlv(TAG_SEQUENCE, &der_tlv(TAG_URI, uri.as_bytes()));
    let mut extension = CustomExtension::from_oid_content(OID_SUBJECT_ALT_NAME, general_names);
    extension.set_criticality(true);
    extension
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - first) as u8);
        out.extend_from_slice(&bytes[first..]);
    }
    out.extend_from_slice(content);
    out
}

/// One issued certificate. Immutable: renewal replaces it in the store, so a holder can tell by
/// identity (`Arc::ptr_eq`, or the serial) whether it is still the current one.
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Hex, lowercase, no separators.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The chain [leaf, mesh CA] and the leaf's key, as rustls presents them.
    pub certified_key: Arc<CertifiedKey>,
    issued_at: SystemTime,
    /// When the store replaces this certificate; set by the store.
    renew_at: SystemTime,
}

impl WorkloadCertificate {
    /// The leaf certificate (first of the chain).
    pub fn leaf(&self) -> Result<&CertificateDer<'static>> {
        self.certified_key
            .cert
            .first()
            .context("empty certificate chain")
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// What the admin endpoint shows per held certificate.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CertificateInfo {
    pub identity: Identity,
    pub serial: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    /// `not_after` in seconds since the Unix epoch, for metrics.
    #[serde(skip)]
    pub not_after_unix: u64,
    /// Certificates issued for this identity since the store first held it.
    pub issued: u64,
}

struct Held {
    current: Arc<WorkloadCertificate>,
    issued: u64,
}

/// The certificates of the identities on this node, shared as `Arc<CertificateStore>`.
pub struct CertificateStore {
    ca: MeshCa,
    /// The one crypto provider of every config built here; never the process default.
    provider: Arc<CryptoProvider>,
    lifetime: Duration,
    renew_fraction: f64,
    held: Mutex<HashMap<Identity, Held>>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("ca", &self.ca)
            .field("lifetime", &self.lifetime)
            .field("renew_fraction", &self.renew_fraction)
            .finish_non_exhaustive()
    }
}

impl CertificateStore {
    /// `lifetime` is how long a certificate is valid (plus the clock-skew backdating);
    /// `renew_fraction` in (0, 1] is the part of it after which the certificate is replaced.
    /// Out-of-range values (the config validates them) fall back to sane ones with a warning.
    pub fn new(ca: MeshCa, lifetime: Duration, renew_fraction: f64) -> Self {
        // X.509 validity has whole seconds; below one second a certificate would expire at once.
        let lifetime = if lifetime < Duration::from_secs(1) {
            warn!(?lifetime, "certificate lifetime below 1 s, using 1 s");
            Duration::from_secs(1)
        } else {
            lifetime
        };
        let renew_fraction = if renew_fraction > 0.0 && renew_fraction <= 1.0 {
            renew_fraction
        } else {
            warn!(renew_fraction, "renew fraction outside (0, 1], using 0.5");
            0.5
        };
        Self {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            lifetime,
            renew_fraction,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The current certificate for `id`: issued lazily on first use, re-issued once
    /// `renew_fraction` of its validity (counted from issuance, not from the backdated
    /// `not_before`) has passed, so always well before expiry.
    pub fn certificate(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>> {
        let now = SystemTime::now();
        let held = lock(&self.held).get(id).map(|held| held.current.clone());
        if let Some(current) = &held {
            if now < current.renew_at {
                return Ok(current.clone());
            }
        }
        // Issued without the lock: key generation and signing must not stall handshakes of
        // other identities.
        match self.issue(id) {
            Ok(fresh) => self
                .install(fresh, true)
                .with_context(|| format!("the certificate of {id} vanished while issued")),
            Err(error) => match held {
                // A failed renewal must not break handshakes while the held certificate is valid.
                Some(current) if now < current.not_after => {
                    warn!(identity = %id, "renewing the workload certificate failed: {error:#}");
                    Ok(current)
                }
                _ => Err(error),
            },
        }
    }

    /// Renews every held certificate that is due (the agent calls this every second, so idle
    /// identities also rotate on time). Returns how many were renewed.
    pub fn renew_due(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<Identity> = lock(&self.held)
            .iter()
            .filter(|(_, held)| now >= held.current.renew_at)
            .map(|(id, _)| id.clone())
            .collect();
        let mut renewed = 0;
        for id in due {
            match self.issue(&id) {
                Ok(fresh) => {
                    let serial = fresh.serial.clone();
                    // Not counted when retain() dropped the identity or certificate() renewed it
                    // meanwhile.
                    let installed = self.install(fresh, false);
                    renewed += usize::from(installed.is_some_and(|cert| cert.serial == serial));
                }
                Err(error) => {
                    warn!(identity = %id, "renewing the workload certificate failed: {error:#}")
                }
            }
        }
        renewed
    }

    /// Drops certificates of identities not in `keep` (pods left the node).
    pub fn retain(&self, keep: &HashSet<Identity>) {
        lock(&self.held).retain(|id, _| {
            let kept = keep.contains(id);
            if !kept {
                debug!(identity = %id, "dropping the workload certificate");
            }
            kept
        });
    }

    /// Whether `cert` is still the certificate the store hands out for its identity; a tunnel
    /// stops reusing a connection made with a certificate that is no longer current.
    pub fn is_current(&self, cert: &WorkloadCertificate) -> bool {
        lock(&self.held)
            .get(&cert.identity)
            .is_some_and(|held| held.current.serial == cert.serial)
    }

    /// For the admin endpoint, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertificateInfo> {
        let mut infos: Vec<CertificateInfo> = lock(&self.held)
            .values()
            .map(|held| CertificateInfo {
                identity: held.current.identity.clone(),
                serial: held.current.serial.clone(),
                not_before: rfc3339(held.current.not_before),
                not_after: rfc3339(held.current.not_after),
                not_after_unix: held
                    .current
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs()),
                issued: held.issued,
            })
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// TLS server side for the listener of a pod with identity `local`: TLS 1.3 only, ALPN "h2",
    /// a client certificate chaining to the mesh CA required, and the server certificate resolved
    /// on every handshake, so rotation applies to the next handshake.
    pub fn server_config(self: &Arc<Self>, local: &Identity) -> Result<Arc<rustls::ServerConfig>> {
        // Fail now rather than in every handshake.
        self.certificate(local)?;
        let roots = RootCertStore {
            roots: vec![self.ca.anchor.clone()],
        };
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .context("building the client certificate verifier")?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(CurrentCertificate {
                store: self.clone(),
                identity: local.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumption would skip the certificate checks on later connections, letting a rotated or
        // expired certificate live on; tunnels are long-lived, so it would save little.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// TLS client side: TLS 1.3 only, ALPN "h2", client certificate = the current certificate of
    /// `source`. The server's certificate must chain to the mesh CA (TLS server-auth usage) and
    /// carry exactly the URI SAN `expected_server`; the server name passed to the connector is
    /// ignored and not sent (certificates carry no DNS names). Also returns the certificate used,
    /// so the caller can notice its rotation ([`CertificateStore::is_current`]).
    pub fn client_config(
        self: &Arc<Self>,
        source: &Identity,
        expected_server: &Identity,
    ) -> Result<(Arc<rustls::ClientConfig>, Arc<WorkloadCertificate>)> {
        let cert = self.certificate(source)?;
        let config = self.client_config_with(cert.certified_key.clone(), expected_server)?;
        Ok((config, cert))
    }

    fn client_config_with(
        &self,
        client_key: Arc<CertifiedKey>,
        expected_server: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let verifier = MeshServerVerifier {
            anchors: vec![self.ca.anchor.clone()],
            expected: expected_server.clone(),
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(client_key)));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        // The name would tell on-path observers which workload is contacted, for no use.
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    fn issue(&self, id: &Identity) -> Result<WorkloadCertificate> {
        let mut cert = self.ca.issue(id, self.lifetime, &self.provider)?;
        let validity = cert
            .not_after
            .duration_since(cert.issued_at)
            .unwrap_or_default();
        cert.renew_at = cert.issued_at
            + Duration::try_from_secs_f64(validity.as_secs_f64() * self.renew_fraction)
                .unwrap_or_default();
        Ok(cert)
    }

    /// Makes `fresh` the current certificate of its identity and returns the current one, which is
    /// another caller's if that one renewed concurrently. With `create` false an identity no
    /// longer held is not added back (`None`).
    fn install(
        &self,
        fresh: WorkloadCertificate,
        create: bool,
    ) -> Option<Arc<WorkloadCertificate>> {
        let mut held = lock(&self.held);
        match held.entry(fresh.identity.clone()) {
            Entry::Occupied(mut entry) => {
                let entry = entry.get_mut();
                if SystemTime::now() < entry.current.renew_at {
                    return Some(entry.current.clone());
                }
                let fresh = Arc::new(fresh);
                log_issued("renewed", &fresh);
                entry.current = fresh.clone();
                entry.issued += 1;
                Some(fresh)
            }
            Entry::Vacant(entry) if create => {
                let fresh = Arc::new(fresh);
                log_issued("issued", &fresh);
                entry.insert(Held {
                    current: fresh.clone(),
                    issued: 1,
                });
                Some(fresh)
            }
            Entry::Vacant(_) => None,
        }
    }
}

fn log_issued(what: &str, cert: &WorkloadCertificate) {
    info!(
        identity = %cert.identity,
        serial = %cert.serial,
        not_after = %rfc3339(cert.not_after),
        "{what} workload certificate"
    );
}

/// Resolves the server certificate on every handshake, so rotation needs no new config.
#[derive(Debug)]
struct CurrentCertificate {
    store: Arc<CertificateStore>,
    identity: Identity,
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.store.certificate(&self.identity) {
            Ok(cert) => Some(cert.certified_key.clone()),
            Err(error) => {
                warn!(identity = %self.identity, "no certificate for a TLS handshake: {error:#}");
                None
            }
        }
    }
}

/// Accepts exactly one server: certificate chaining to the mesh CA, with the expected identity.
#[derive(Debug)]
struct MeshServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let found = peer_identity(std::slice::from_ref(end_entity)).map_err(|error| {
            verification_error(format!(
                "server certificate has no usable identity (expected {}): {error:#}",
                self.expected
            ))
        })?;
        if found != self.expected {
            return Err(verification_error(format!(
                "server identity is {found}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A verification failure of weft's own; rustls shows it with `Debug`, so both print the message.
struct VerificationError(String);

impl fmt::Display for VerificationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VerificationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerificationError {}

fn verification_error(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        VerificationError(message),
    ))))
}

/// The rustls counterpart of a webpki error (rustls keeps its own mapping private), so the peer
/// gets the fitting alert.
fn webpki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let error = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(error)
}

/// The identity in a peer's leaf certificate (exactly one URI SAN, a valid SPIFFE ID), e.g. from
/// `ServerConnection::peer_certificates()` after the handshake. It does not verify the chain: only
/// use it on certificates a handshake has verified.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<Identity> {
    let leaf = certs.first().context("the peer presented no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow!("the peer certificate is not valid X.509: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow!("the peer certificate has an invalid subjectAltName: {e}"))?
        .context("the peer certificate has no subjectAltName")?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Identity::parse(uri),
        (None, _) => bail!("the peer certificate has no URI SAN"),
        (Some(_), Some(_)) => bail!("the peer certificate has more than one URI SAN"),
    }
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs())
}

fn offset_date_time(unix_secs: u64) -> Result<time::OffsetDateTime> {
    i64::try_from(unix_secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .with_context(|| format!("time {unix_secs} is out of range"))
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) => rfc3339_unix(since.as_secs()),
        Err(_) => "before 1970".to_owned(),
    }
}

fn rfc3339_unix(unix_secs: u64) -> String {
    i64::try_from(unix_secs).map_or_else(|_| unix_secs.to_string(), rfc3339_unix_signed)
}

/// Formatted by hand: the `time` crate's formatting needs a feature weft does not enable.
fn rfc3339_unix_signed(unix_secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix time {unix_secs}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{BasicConstraints, DnType, SanType};
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use x509_parser::public_key::PublicKey;

    use super::*;

    const TD: &str = "cluster.local";

    fn id(service_account: &str) -> Identity {
        Identity::new(TD, "default", service_account)
    }

    struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        params
    }

    fn self_signed(params: CertificateParams) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    fn write_ca(dir: &TempDir, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.path().join("ca.crt");
        let key_path = dir.path().join("ca.key");
        std::fs::write(&cert_path, cert_pem).unwrap();
        std::fs::write(&key_path, key_pem).unwrap();
        (cert_path, key_path)
    }

    /// A CA written to disk and loaded into a store.
    struct Mesh {
        _dir: TempDir,
        ca: TestCa,
        store: Arc<CertificateStore>,
    }

    fn mesh(name: &str, lifetime: Duration, renew_fraction: f64) -> Mesh {
        let dir = TempDir::new().unwrap();
        let ca = self_signed(ca_params(name));
        let (cert_path, key_path) = write_ca(&dir, &ca.cert.pem(), &ca.key.serialize_pem());
        let loaded = MeshCa::load(&cert_path, &key_path).unwrap();
        let store = Arc::new(CertificateStore::new(loaded, lifetime, renew_fraction));
        Mesh {
            _dir: dir,
            ca,
            store,
        }
    }

    fn hour_mesh(name: &str) -> Mesh {
        mesh(name, Duration::from_secs(3600), 0.5)
    }

    fn load_error(cert_pem: &str, key_pem: &str) -> String {
        let dir = TempDir::new().unwrap();
        let (cert_path, key_path) = write_ca(&dir, cert_pem, key_pem);
        format!("{:#}", MeshCa::load(&cert_path, &key_path).unwrap_err())
    }

    fn assert_contains(haystack: &str, needles: &[&str]) {
        for needle in needles {
            assert!(
                haystack.contains(needle),
                "{needle:?} not in error: {haystack}"
            );
        }
    }

    #[test]
    fn store_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateStore>();
        assert_send_sync::<WorkloadCertificate>();
    }

    #[test]
    fn identity_parses_and_prints_the_spiffe_uri() {
        let uri = "spiffe://cluster.local/ns/shop/sa/front-end.v2_x";
        let parsed = Identity::parse(uri).unwrap();
        assert_eq!(parsed, Identity::new(TD, "shop", "front-end.v2_x"));
        assert_eq!(parsed.trust_domain(), TD);
        assert_eq!(parsed.namespace(), "shop");
        assert_eq!(parsed.service_account(), "front-end.v2_x");
        assert_eq!(parsed.to_string(), uri);
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            format!("\"{uri}\"")
        );
    }

    #[test]
    fn identity_parse_rejects_malformed_uris() {
        for (uri, reason) in [
            ("", "scheme"),
            ("cluster.local/ns/a/sa/b", "scheme"),
            ("//cluster.local/ns/a/sa/b", "scheme"),
            ("https://cluster.local/ns/a/sa/b", "scheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:/cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "trust domain"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/", "exactly"),
            ("spiffe://cluster.local/ns/a", "exactly"),
            ("spiffe://cluster.local/ns/a/sa", "exactly"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "exactly"),
            ("spiffe://cluster.local/ns/a/sa/b/", "exactly"),
            ("spiffe://cluster.local//ns/a/sa/b", "exactly"),
            ("spiffe://cluster.local/sa/b/ns/a", "exactly"),
            ("spiffe://cluster.local/namespace/a/sa/b", "exactly"),
            ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "empty service account"),
            ("spiffe://cluster.local/ns/../sa/b", "must not be"),
            ("spiffe://cluster.local/ns/a/sa/.", "must not be"),
            ("spiffe://cluster.local/ns/%61/sa/b", "may only hold"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "may only hold"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "may only hold"),
            ("spiffe://cluster.local/ns/a b/sa/b", "may only hold"),
        ] {
            let error = format!("{:#}", Identity::parse(uri).unwrap_err());
            assert_contains(&error, &["invalid SPIFFE ID", reason]);
        }
        let too_long = format!("spiffe://{TD}/ns/a/sa/{}", "b".repeat(MAX_SPIFFE_ID_LEN));
        assert_contains(
            &format!("{:#}", Identity::parse(&too_long).unwrap_err()),
            &["longer than"],
        );
    }

    #[test]
    fn load_names_a_missing_file() {
        let dir = TempDir::new().unwrap();
        let ca = self_signed(ca_params("mesh"));
        let (cert_path, key_path) = write_ca(&dir, &ca.cert.pem(), &ca.key.serialize_pem());
        let missing = dir.path().join("missing.crt");
        let error = format!("{:#}", MeshCa::load(&missing, &key_path).unwrap_err());
        assert_contains(&error, &["cannot read mesh CA certificate", "missing.crt"]);
        let missing = dir.path().join("missing.key");
        let error = format!("{:#}", MeshCa::load(&cert_path, &missing).unwrap_err());
        assert_contains(&error, &["cannot read mesh CA key", "missing.key"]);
    }

    #[test]
    fn load_rejects_files_that_are_not_pem_or_hold_the_wrong_thing() {
        let ca = self_signed(ca_params("mesh"));
        let (cert_pem, key_pem) = (ca.cert.pem(), ca.key.serialize_pem());

        let error = load_error("this is not a certificate\n", &key_pem);
        assert_contains(&error, &["ca.crt", "is not PEM"]);
        let error = load_error(&cert_pem, "\u{1}\u{2}garbage");
        assert_contains(&error, &["ca.key", "is not PEM"]);
        let error = load_error(
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            &key_pem,
        );
        assert_contains(&error, &["ca.crt", "is not valid PEM"]);
        let error = load_error(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            &key_pem,
        );
        assert_contains(&error, &["ca.crt", "not a valid X.509 certificate"]);

        let error = load_error(&key_pem, &key_pem);
        assert_contains(&error, &["ca.crt", "holds no certificate"]);
        let error = load_error(&cert_pem, &cert_pem);
        assert_contains(&error, &["ca.key", "holds no unencrypted private key"]);
        let sec1_labelled = key_pem.replace("PRIVATE KEY", "EC PRIVATE KEY");
        let error = load_error(&cert_pem, &sec1_labelled);
        assert_contains(&error, &["ca.key", "SEC1", "openssl pkcs8 -topk8"]);

        // The control: the same files in the right places load.
        let dir = TempDir::new().unwrap();
        let (cert_path, key_path) = write_ca(&dir, &cert_pem, &key_pem);
        MeshCa::load(&cert_path, &key_path).unwrap();
    }

    #[test]
    fn load_rejects_a_certificate_that_is_not_a_ca() {
        let mut params = ca_params("leaf");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = self_signed(params);
        let error = load_error(&leaf.cert.pem(), &leaf.key.serialize_pem());
        assert_contains(
            &error,
            &["ca.crt", "not a CA certificate", "basicConstraints"],
        );

        let mut params = ca_params("no basic constraints");
        params.is_ca = IsCa::NoCa;
        let leaf = self_signed(params);
        let error = load_error(&leaf.cert.pem(), &leaf.key.serialize_pem());
        assert_contains(&error, &["ca.crt", "not a CA certificate"]);

        let mut params = ca_params("no keyCertSign");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let ca = self_signed(params);
        let error = load_error(&ca.cert.pem(), &ca.key.serialize_pem());
        assert_contains(&error, &["ca.crt", "lacks keyCertSign"]);
    }

    #[test]
    fn load_rejects_a_ca_outside_its_validity() {
        let now = time::OffsetDateTime::now_utc();
        let mut params = ca_params("expired");
        params.not_before = now - time::Duration::days(2);
        params.not_after = now - time::Duration::days(1);
        let ca = self_signed(params);
        let error = load_error(&ca.cert.pem(), &ca.key.serialize_pem());
        assert_contains(&error, &["ca.crt", "has expired", "not after"]);

        let mut params = ca_params("future");
        params.not_before = now + time::Duration::days(1);
        params.not_after = now + time::Duration::days(2);
        let ca = self_signed(params);
        let error = load_error(&ca.cert.pem(), &ca.key.serialize_pem());
        assert_contains(&error, &["ca.crt", "not yet valid", "not before"]);
    }

    #[test]
    fn load_rejects_a_key_of_another_certificate() {
        let ca = self_signed(ca_params("mesh"));
        let other_key = KeyPair::generate().unwrap();
        let error = load_error(&ca.cert.pem(), &other_key.serialize_pem());
        assert_contains(&error, &["ca.key", "does not belong", "ca.crt"]);
    }

    #[test]
    fn load_accepts_p384_and_ed25519_cas() {
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let cert = ca_params("mesh").self_signed(&key).unwrap();
            let dir = TempDir::new().unwrap();
            let (cert_path, key_path) = write_ca(&dir, &cert.pem(), &key.serialize_pem());
            let store = CertificateStore::new(
                MeshCa::load(&cert_path, &key_path).unwrap(),
                Duration::from_secs(60),
                0.5,
            );
            let issued = store.certificate(&id("web")).unwrap();
            assert_eq!(
                peer_identity(&issued.certified_key.cert).unwrap(),
                id("web")
            );
        }
    }

    #[test]
    fn certificates_are_issued_lazily_as_specified() {
        let mesh = hour_mesh("mesh");
        let web = id("web");
        assert!(mesh.store.snapshot().is_empty());

        let cert = mesh.store.certificate(&web).unwrap();
        assert_eq!(cert.identity, web);
        assert_eq!(peer_identity(&cert.certified_key.cert).unwrap(), web);
        let validity = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(
            (Duration::from_secs(3659)..=Duration::from_secs(3660)).contains(&validity),
            "validity {validity:?}"
        );
        let age = SystemTime::now().duration_since(cert.not_before).unwrap();
        assert!((Duration::from_secs(59)..Duration::from_secs(62)).contains(&age));

        // The chain is [leaf, CA].
        let chain = &cert.certified_key.cert;
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], mesh.ca.cert.der());
        cert.certified_key.keys_match().unwrap();

        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        assert!(
            leaf.subject().as_raw().len() <= 2,
            "subject should be empty"
        );
        assert!(!leaf.is_ca());
        assert!(leaf.basic_constraints().unwrap().is_some());
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
        );
        let key_usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(key_usage.digital_signature() && !key_usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(
            matches!(leaf.public_key().parsed(), Ok(PublicKey::EC(point)) if point.key_size() == 256)
        );
        let serial_hex: String = leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(serial_hex, cert.serial);
        assert_eq!(cert.serial.len(), 32);
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
        );

        // Held: the second call returns the same certificate.
        let again = mesh.store.certificate(&web).unwrap();
        assert!(Arc::ptr_eq(&cert, &again));
        assert_eq!(mesh.store.renew_due(), 0);
        let other = mesh.store.certificate(&id("db")).unwrap();
        assert_ne!(other.serial, cert.serial);
    }

    #[test]
    fn long_identities_get_long_form_der_lengths() {
        assert_eq!(der_tlv(0x04, &[7; 5]), [0x04, 5, 7, 7, 7, 7, 7]);
        assert_eq!(der_tlv(0x04, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(der_tlv(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);

        let mesh = hour_mesh("mesh");
        let long = Identity::new(TD, "default", &"s".repeat(300));
        let cert = mesh.store.certificate(&long).unwrap();
        assert_eq!(peer_identity(&cert.certified_key.cert).unwrap(), long);
    }

    #[test]
    fn certificates_are_not_issued_for_invalid_identities() {
        let mesh = hour_mesh("mesh");
        let error = mesh
            .store
            .certificate(&Identity::new(TD, "a/b", "web"))
            .unwrap_err();
        assert_contains(&format!("{error:#}"), &["refusing to issue", "a/b"]);
        assert!(mesh.store.snapshot().is_empty());
    }

    #[test]
    fn certificate_is_reissued_once_renewal_is_due() {
        let mesh = mesh("mesh", Duration::from_secs(2), 0.5);
        let web = id("web");
        let first = mesh.store.certificate(&web).unwrap();
        assert_eq!(mesh.store.certificate(&web).unwrap().serial, first.serial);
        assert!(mesh.store.is_current(&first));

        std::thread::sleep(Duration::from_millis(1100));
        let second = mesh.store.certificate(&web).unwrap();
        assert_ne!(second.serial, first.serial);
        assert!(!mesh.store.is_current(&first));
        assert!(mesh.store.is_current(&second));
        assert_eq!(mesh.store.snapshot()[0].issued, 2);
    }

    #[test]
    fn renew_due_rotates_idle_identities() {
        let mesh = mesh("mesh", Duration::from_secs(2), 0.5);
        let a = mesh.store.certificate(&id("a")).unwrap();
        let b = mesh.store.certificate(&id("b")).unwrap();
        assert_eq!(mesh.store.renew_due(), 0);

        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(mesh.store.renew_due(), 2);
        assert_eq!(mesh.store.renew_due(), 0);
        let snapshot = mesh.store.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert!(snapshot.iter().all(|info| info.issued == 2));
        assert_ne!(snapshot[0].serial, a.serial);
        assert_ne!(snapshot[1].serial, b.serial);
        assert!(!mesh.store.is_current(&a));
    }

    #[test]
    fn retain_drops_and_snapshot_reports() {
        let mesh = hour_mesh("mesh");
        let (a, b) = (id("a"), id("b"));
        let cert_b = mesh.store.certificate(&b).unwrap();
        let cert_a = mesh.store.certificate(&a).unwrap();

        let snapshot = mesh.store.snapshot();
        assert_eq!(
            snapshot,
            [&cert_a, &cert_b].map(|cert| CertificateInfo {
                identity: cert.identity.clone(),
                serial: cert.serial.clone(),
                not_before: rfc3339(cert.not_before),
                not_after: rfc3339(cert.not_after),
                not_after_unix: cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                issued: 1,
            })
        );
        let json = serde_json::to_value(&snapshot[0]).unwrap();
        assert_eq!(json["identity"], "spiffe://cluster.local/ns/default/sa/a");
        assert_eq!(json["serial"], cert_a.serial.as_str());
        assert_eq!(json["issued"], 1);
        let not_after = json["not_after"].as_str().unwrap();
        assert_eq!(not_after.len(), "2024-01-01T00:00:00Z".len());
        assert!(not_after.ends_with('Z') && &not_after[10..11] == "T");

        mesh.store.retain(&HashSet::from([a.clone()]));
        let snapshot = mesh.store.snapshot();
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].identity, a);
        assert!(!mesh.store.is_current(&cert_b));

        // A renewal that races with retain() does not bring the identity back.
        let fresh = mesh.store.issue(&b).unwrap();
        assert!(mesh.store.install(fresh, false).is_none());
        assert_eq!(mesh.store.snapshot().len(), 1);
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_unix(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn peer_identity_requires_exactly_one_valid_uri_san() {
        fn leaf(sans: Vec<SanType>) -> CertificateDer<'static> {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            let key = KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().clone()
        }
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let dns = |s: &str| SanType::DnsName(s.try_into().unwrap());

        let error =
            |certs: &[CertificateDer<'_>]| format!("{:#}", peer_identity(certs).unwrap_err());
        assert_contains(&error(&[]), &["no certificate"]);
        assert_contains(
            &error(&[CertificateDer::from(vec![1, 2, 3])]),
            &["not valid X.509"],
        );
        assert_contains(&error(&[leaf(vec![])]), &["no subjectAltName"]);
        assert_contains(&error(&[leaf(vec![dns("web.default")])]), &["no URI SAN"]);
        assert_contains(
            &error(&[leaf(vec![
                uri("spiffe://cluster.local/ns/default/sa/a"),
                uri("spiffe://cluster.local/ns/default/sa/b"),
            ])]),
            &["more than one URI SAN"],
        );
        assert_contains(
            &error(&[leaf(vec![uri("spiffe://cluster.local/ns/default")])]),
            &["invalid SPIFFE ID"],
        );
        // Other SAN types next to the one URI are fine.
        let found = peer_identity(&[leaf(vec![
            dns("web.default"),
            uri("spiffe://cluster.local/ns/default/sa/a"),
        ])])
        .unwrap();
        assert_eq!(found, id("a"));
    }

    /// What each side of a handshake saw.
    struct Outcome {
        /// The client's identity as the server read it.
        server: Result<Identity, String>,
        /// The chain the server presented.
        client: Result<Vec<CertificateDer<'static>>, String>,
    }

    /// A handshake over an in-memory pipe plus one round trip, so that a client certificate the
    /// server rejects (after the client considers TLS 1.3 done) also fails the client.
    async fn handshake(
        server_config: Arc<rustls::ServerConfig>,
        client_config: Arc<rustls::ClientConfig>,
    ) -> Outcome {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = async move {
            let mut tls = TlsAcceptor::from(server_config)
                .accept(server_io)
                .await
                .map_err(|e| e.to_string())?;
            let (_, connection) = tls.get_ref();
            assert_eq!(connection.alpn_protocol(), Some(ALPN_H2));
            let peer = peer_identity(connection.peer_certificates().unwrap_or_default())
                .map_err(|e| format!("{e:#}"))?;
            let mut ping = [0; 4];
            tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        let client = async move {
            // Any name: the verifier ignores it and SNI is off.
            let name = ServerName::try_from("ignored.invalid").unwrap();
            let mut tls = TlsConnector::from(client_config)
                .connect(name, client_io)
                .await
                .map_err(|e| e.to_string())?;
            let (_, connection) = tls.get_ref();
            assert_eq!(connection.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                connection.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let chain = connection.peer_certificates().unwrap_or_default().to_vec();
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut pong = [0; 4];
            tls.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
            assert_eq!(&pong, b"pong");
            Ok(chain)
        };
        let (server, client) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        })
        .await
        .expect("the handshake hung");
        Outcome { server, client }
    }

    #[tokio::test]
    async fn mutual_tls_between_expected_identities_succeeds() {
        let mesh = hour_mesh("mesh");
        let (server_id, client_id) = (id("server"), id("client"));
        let server_config = mesh.store.server_config(&server_id).unwrap();
        let (client_config, client_cert) =
            mesh.store.client_config(&client_id, &server_id).unwrap();
        assert_eq!(client_cert.identity, client_id);

        let outcome = handshake(server_config, client_config).await;
        assert_eq!(outcome.server.unwrap(), client_id);
        let chain = outcome.client.unwrap();
        assert_eq!(peer_identity(&chain).unwrap(), server_id);
        let server_cert = mesh.store.certificate(&server_id).unwrap();
        assert_eq!(chain, server_cert.certified_key.cert);
    }

    #[tokio::test]
    async fn client_rejects_a_server_with_another_identity() {
        let mesh = hour_mesh("mesh");
        let server_config = mesh.store.server_config(&id("x")).unwrap();
        let (client_config, _) = mesh.store.client_config(&id("client"), &id("y")).unwrap();

        let outcome = handshake(server_config, client_config).await;
        assert_contains(
            &outcome.client.unwrap_err(),
            &["server identity is spiffe://cluster.local/ns/default/sa/x, expected spiffe://cluster.local/ns/default/sa/y"],
        );
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn server_rejects_a_client_certificate_from_another_ca() {
        let mesh = hour_mesh("mesh");
        let other = hour_mesh("other");
        // The client trusts the mesh CA (else it would abort first) but presents a certificate
        // of the other CA.
        let foreign = other.store.certificate(&id("client")).unwrap();
        let client_config = mesh
            .store
            .client_config_with(foreign.certified_key.clone(), &id("x"))
            .unwrap();

        let outcome = handshake(mesh.store.server_config(&id("x")).unwrap(), client_config).await;
        assert_contains(&outcome.server.unwrap_err(), &["UnknownIssuer"]);
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn client_rejects_a_server_certificate_from_another_ca() {
        let mesh = hour_mesh("mesh");
        let other = hour_mesh("other");
        // Same identity, wrong issuer.
        let server_config = other.store.server_config(&id("x")).unwrap();
        let (client_config, _) = mesh.store.client_config(&id("client"), &id("x")).unwrap();

        let outcome = handshake(server_config, client_config).await;
        assert_contains(&outcome.client.unwrap_err(), &["UnknownIssuer"]);
        assert!(outcome.server.is_err());
    }

    /// A client certificate made directly with rcgen from the mesh CA, with the given validity.
    fn client_key(
        ca: &TestCa,
        identity: &Identity,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Arc<CertifiedKey> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap();
        Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), ca.cert.der().clone()],
            signing_key,
        ))
    }

    #[tokio::test]
    async fn server_rejects_an_expired_client_certificate() {
        let mesh = hour_mesh("mesh");
        let server_id = id("x");
        let now = time::OffsetDateTime::now_utc();

        // The control: the same kind of certificate, still valid, is accepted.
        let valid = client_key(
            &mesh.ca,
            &id("client"),
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        );
        let client_config = mesh.store.client_config_with(valid, &server_id).unwrap();
        let outcome = handshake(mesh.store.server_config(&server_id).unwrap(), client_config).await;
        assert_eq!(outcome.server.unwrap(), id("client"));

        let expired = client_key(
            &mesh.ca,
            &id("client"),
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        );
        let client_config = mesh.store.client_config_with(expired, &server_id).unwrap();
        let outcome = handshake(mesh.store.server_config(&server_id).unwrap(), client_config).await;
        assert_contains(&outcome.server.unwrap_err(), &["certificate expired"]);
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn server_requires_a_client_certificate() {
        let mesh = hour_mesh("mesh");
        let verifier = MeshServerVerifier {
            anchors: vec![mesh.store.ca.anchor.clone()],
            expected: id("x"),
            algorithms: mesh.store.provider.signature_verification_algorithms,
        };
        let mut client_config =
            rustls::ClientConfig::builder_with_provider(mesh.store.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
        client_config.alpn_protocols = vec![ALPN_H2.to_vec()];

        let outcome = handshake(
            mesh.store.server_config(&id("x")).unwrap(),
            Arc::new(client_config),
        )
        .await;
        assert_contains(&outcome.server.unwrap_err(), &["no certificates"]);
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn rotation_applies_to_the_next_handshake() {
        let mesh = mesh("mesh", Duration::from_secs(2), 0.5);
        let (server_id, client_id) = (id("server"), id("client"));
        let server_config = mesh.store.server_config(&server_id).unwrap();

        let (client_config, first_client_cert) =
            mesh.store.client_config(&client_id, &server_id).unwrap();
        let first = handshake(server_config.clone(), client_config).await;
        let first_chain = first.client.unwrap();

        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(mesh.store.renew_due(), 2);
        assert!(!mesh.store.is_current(&first_client_cert));

        let (client_config, second_client_cert) =
            mesh.store.client_config(&client_id, &server_id).unwrap();
        assert_ne!(second_client_cert.serial, first_client_cert.serial);
        // Same server config: the resolver picks up the renewed certificate.
        let second = handshake(server_config, client_config).await;
        assert_eq!(second.server.unwrap(), client_id);
        let second_chain = second.client.unwrap();
        assert_ne!(second_chain[0], first_chain[0]);
        assert_eq!(
            second_chain,
            mesh.store
                .certificate(&server_id)
                .unwrap()
                .certified_key
                .cert
        );
    }
}
