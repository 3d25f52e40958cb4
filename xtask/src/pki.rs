//! A throwaway certificate authority for the lab: the mesh CA the agents are given, and leaf
//! certificates for tests (expired ones, wrong identities) and for the benchmark's HAProxy pair.
//! Every key is ECDSA P-256, as the agents' own workload certificates.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// File names [`TestCa::write`] uses.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`: a workload's identity.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

impl TestCa {
    /// A new self-signed CA, valid from a day ago (clock skew between lab processes is nil, but
    /// tests may back-date leaves) for ten years.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .with_context(|| format!("self-signing CA {common_name:?}"))?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Writes the CA certificate and key (mode 0600) to `dir`, creating it; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert_path = dir.join(CA_CERT_FILE);
        fs::write(&cert_path, self.cert_pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        let key_path = dir.join(CA_KEY_FILE);
        write_private(&key_path, &self.key_pem())?;
        Ok((cert_path, key_path))
    }

    /// A leaf certificate for `spiffe_uri` (its only SAN), usable as server and client, valid
    /// from `not_before` to `not_after`; returns the certificate and its key as PEM.
    pub fn issue(
        &self,
        spiffe_uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String)> {
        self.issue_with_dns(spiffe_uri, &[], not_before, not_after)
    }

    /// [`TestCa::issue`] with DNS SANs added after the URI, for peers that check a host name
    /// (HAProxy's `verifyhost`) rather than a SPIFFE ID.
    pub fn issue_with_dns(
        &self,
        spiffe_uri: &str,
        dns_names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String)> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a leaf key")?;
        let mut params = CertificateParams::default();
        // The SAN extension is not marked critical, so the subject must not be empty (RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "weft lab");
        let uri = spiffe_uri
            .to_owned()
            .try_into()
            .with_context(|| format!("{spiffe_uri:?} is not an IA5 string"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in dns_names {
            let dns = (*name)
                .to_owned()
                .try_into()
                .with_context(|| format!("{name:?} is not a DNS name"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .with_context(|| format!("issuing a certificate for {spiffe_uri}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::parse_x509_pem};

    use super::*;

    fn with_cert<T>(pem: &str, check: impl FnOnce(&X509Certificate) -> T) -> T {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        check(&pem.parse_x509().unwrap())
    }

    fn san(cert: &X509Certificate) -> Vec<String> {
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        ext.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => format!("uri:{uri}"),
                GeneralName::DNSName(dns) => format!("dns:{dns}"),
                other => format!("other:{other}"),
            })
            .collect()
    }

    #[test]
    fn leaf_has_one_uri_san_and_chains_to_the_ca() {
        let ca = TestCa::new("weft test CA").unwrap();
        let id = spiffe_id("cluster.local", "lab", "client");
        assert_eq!(id, "spiffe://cluster.local/ns/lab/sa/client");
        let not_before = OffsetDateTime::now_utc() - Duration::hours(2);
        let not_after = not_before + Duration::hours(1);
        let (cert_pem, key_pem) = ca.issue(&id, not_before, not_after).unwrap();
        assert!(KeyPair::from_pem(&key_pem).is_ok());
        let ca_pem = ca.cert_pem();
        with_cert(&ca_pem, |ca_cert| {
            assert!(ca_cert.is_ca());
            with_cert(&cert_pem, |leaf| {
                assert_eq!(san(leaf), vec![format!("uri:{id}")]);
                assert_eq!(leaf.issuer(), ca_cert.subject());
                leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
                assert!(!leaf.is_ca());
                let eku = leaf.extended_key_usage().unwrap().unwrap().value;
                assert!(eku.server_auth && eku.client_auth);
                // Expired on purpose: the validity is exactly what was asked for.
                assert_eq!(
                    leaf.validity().not_after.timestamp(),
                    not_after.unix_timestamp()
                );
                assert!(!leaf.validity().is_valid());
            });
        });
    }

    #[test]
    fn dns_names_follow_the_uri_and_files_are_written() {
        let ca = TestCa::new("weft test CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let (cert_pem, _) = ca
            .issue_with_dns(
                "spiffe://cluster.local/ns/lab/sa/server",
                &["server.lab"],
                now,
                now + Duration::hours(1),
            )
            .unwrap();
        with_cert(&cert_pem, |leaf| {
            assert_eq!(
                san(leaf),
                [
                    "uri:spiffe://cluster.local/ns/lab/sa/server",
                    "dns:server.lab"
                ]
            );
            assert!(leaf.validity().is_valid());
        });
        assert!(ca.issue_with_dns("spiffe://x/é", &[], now, now).is_err());

        let dir = std::env::temp_dir().join(format!("weft-pki-test-{}", std::process::id()));
        let (cert_path, key_path) = ca.write(&dir).unwrap();
        assert_eq!(fs::read_to_string(&cert_path).unwrap(), ca.cert_pem());
        assert_eq!(fs::read_to_string(&key_path).unwrap(), ca.key_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
