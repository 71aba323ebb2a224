//! Outbound SRTP for forwarded copies, done by Meridian rather than by rtc's sender.
//!
//! rtc encrypts every packet written through `write_rtp` into a fresh buffer, after a marshal
//! into another and a trip through the interceptor chain. A forwarding SFU writes the same
//! payload to many subscribers, so the worker writes each copy's header and payload into a
//! reused buffer and encrypts it there with [`SrtpSender`]: RFC 3711 (AES-CM-128 with
//! HMAC-SHA1-80) and RFC 7714 (AEAD AES-128-GCM), on the cipher primitives of rtc's own crypto
//! provider. Nothing here allocates per packet.
//!
//! The keys come from rtc. It exposes no accessor for a connection's SRTP keys, but it derives
//! its session keys through the connection's crypto provider, which the application chooses
//! ([`KeyCapture`]): rtc-srtp's key derivation encrypts, with the master key, the master salt
//! with label 0 and block counter 0 first, and rtc builds the connection's outbound context
//! before its inbound one. So the first master key the provider sees is the outbound one, and
//! the first block encrypted with it holds the master salt. This is rtc 0.21.1's behaviour
//! (pinned with `=`); `sfu::core_tests` has a handshake test that fails if an upgrade changes
//! it, and the worker checks the key against the first SRTCP packet rtc itself protects.
//!
//! Nonce discipline: an SRTP packet index (rollover counter and sequence number) must never be
//! encrypted twice with different bytes under one key (under AES-GCM that gives away the
//! authentication key). Once a connection is encrypted here, rtc must never send RTP on it,
//! and a retransmission on a primary SSRC must be byte-identical to the original copy.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rtc::crypto::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher,
    StreamCipherAlgorithm,
};

/// The SRTP profiles Meridian encrypts itself: the two every browser offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// RFC 7714 AEAD_AES_128_GCM: 12-byte salt, 16-byte tag.
    AeadAes128Gcm,
    /// RFC 3711 AES_CM_128_HMAC_SHA1_80: 14-byte salt, 10-byte tag.
    Aes128CmHmacSha1_80,
}

impl Profile {
    /// The profile named as rtc's transport statistics name it (`srtp_cipher`).
    pub fn from_stats_name(name: &str) -> Option<Self> {
        match name {
            "SRTP_AEAD_AES_128_GCM" => Some(Self::AeadAes128Gcm),
            "SRTP_AES128_CM_HMAC_SHA1_80" => Some(Self::Aes128CmHmacSha1_80),
            _ => None,
        }
    }

    pub fn salt_len(self) -> usize {
        match self {
            Self::AeadAes128Gcm => 12,
            Self::Aes128CmHmacSha1_80 => 14,
        }
    }

    /// Bytes SRTP adds to an RTP packet.
    pub fn overhead(self) -> usize {
        match self {
            Self::AeadAes128Gcm => 16,
            Self::Aes128CmHmacSha1_80 => 10,
        }
    }
}

/// Why a connection's copies cannot be encrypted here (it then falls back to rtc's sender).
#[derive(Debug, thiserror::Error)]
pub enum SrtpError {
    #[error(
        "the connection negotiated SRTP profile {0:?}, which Meridian does not encrypt itself"
    )]
    UnsupportedProfile(String),
    #[error(
        "rtc derived {0} SRTP master keys on this connection where 2 (outbound, inbound) were \
         expected: the key capture no longer matches rtc's key derivation"
    )]
    KeysNotCaptured(usize),
    #[error("the crypto provider failed: {0}")]
    Crypto(#[from] CryptoError),
    #[error("not an RTP packet (shorter than its header)")]
    Malformed,
}

/// One SRTP master key and salt, as captured from rtc's key derivation.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub key: [u8; 16],
    /// The first key-derivation block: the master salt followed by zeros (12 or 14 bytes of
    /// salt, depending on the profile, which the block alone does not tell).
    pub salt_block: [u8; 16],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

const LABEL_ENCRYPTION: u8 = 0;
const LABEL_AUTHENTICATION: u8 = 1;
const LABEL_SALT: u8 = 2;

/// RFC 3711 §4.3.3 key derivation (AES-CM PRF, key derivation rate 0) into `out`.
fn derive(
    crypto: &dyn RTCCrypto,
    master: &MasterKey,
    salt_len: usize,
    label: u8,
    out: &mut [u8],
) -> Result<(), CryptoError> {
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = [0u8; 16];
        block[..salt_len].copy_from_slice(&master.salt_block[..salt_len]);
        block[7] ^= label;
        block[14] = (i >> 8) as u8;
        block[15] = i as u8;
        crypto.block_encrypt(BlockCipherAlgorithm::Aes128, &master.key, &mut block)?;
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    Ok(())
}

enum Cipher {
    Gcm {
        aead: Box<dyn AeadCipher>,
        salt: [u8; 12],
    },
    Cm {
        ctr: Box<dyn StreamCipher>,
        mac: Box<dyn Mac>,
        salt: [u8; 14],
    },
}

/// The rollover counter of one SSRC, as its sender keeps it.
#[derive(Debug, Clone, Copy)]
struct Rollover {
    ssrc: u32,
    roc: u32,
    highest: u16,
}

impl Rollover {
    /// The rollover counter of `seq` (RFC 3711 §3.3.1's estimate, from the highest sent): a
    /// retransmission of a number sent before a wrap keeps the counter it was sent under.
    /// Moves the highest on when `seq` is newer.
    fn index_of(&mut self, seq: u16) -> u32 {
        let roc = if self.highest < 0x8000 {
            if seq > self.highest && seq - self.highest > 0x8000 {
                self.roc.wrapping_sub(1)
            } else {
                self.roc
            }
        } else if self.highest - 0x8000 > seq {
            self.roc.wrapping_add(1)
        } else {
            self.roc
        };
        if roc == self.roc.wrapping_add(1) || (roc == self.roc && seq > self.highest) {
            self.roc = roc;
            self.highest = seq;
        }
        roc
    }
}

/// Encrypts the RTP packets of one connection in place (see the module docs).
pub struct SrtpSender {
    profile: Profile,
    cipher: Cipher,
    /// Per SSRC; a subscribe connection has a handful (each consumer and its RTX stream).
    streams: Vec<Rollover>,
}

impl SrtpSender {
    /// A sender keyed with the outbound master key of a connection that negotiated `profile`.
    pub fn new(
        profile: Profile,
        master: &MasterKey,
        crypto: &dyn RTCCrypto,
    ) -> Result<Self, SrtpError> {
        let salt_len = profile.salt_len();
        let mut key = [0u8; 16];
        derive(crypto, master, salt_len, LABEL_ENCRYPTION, &mut key)?;
        let cipher = match profile {
            Profile::AeadAes128Gcm => {
                let mut salt = [0u8; 12];
                derive(crypto, master, salt_len, LABEL_SALT, &mut salt)?;
                Cipher::Gcm {
                    aead: crypto.new_aead(AeadAlgorithm::Aes128Gcm, &key)?,
                    salt,
                }
            }
            Profile::Aes128CmHmacSha1_80 => {
                let mut auth = [0u8; 20];
                derive(crypto, master, salt_len, LABEL_AUTHENTICATION, &mut auth)?;
                let mut salt = [0u8; 14];
                derive(crypto, master, salt_len, LABEL_SALT, &mut salt)?;
                Cipher::Cm {
                    ctr: crypto.new_stream_cipher(StreamCipherAlgorithm::Aes128Ctr, &key)?,
                    mac: crypto.new_hmac(HmacAlgorithm::Sha1, &auth)?,
                    salt,
                }
            }
        };
        Ok(Self {
            profile,
            cipher,
            streams: Vec::new(),
        })
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Encrypts the plain RTP packet in `buf` in place and appends its authentication tag.
    /// `buf` needs [`Profile::overhead`] bytes of spare capacity or it grows (allocates).
    pub fn protect(&mut self, buf: &mut BytesMut) -> Result<(), SrtpError> {
        let header_len = rtp_header_len(buf).ok_or(SrtpError::Malformed)?;
        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let seq = u16::from_be_bytes([buf[2], buf[3]]);
        let roc = match self.streams.iter_mut().find(|s| s.ssrc == ssrc) {
            Some(s) => s.index_of(seq),
            None => {
                self.streams.push(Rollover {
                    ssrc,
                    roc: 0,
                    highest: seq,
                });
                0
            }
        };
        let len = buf.len();
        match &mut self.cipher {
            Cipher::Gcm { aead, salt } => {
                // RFC 7714 §8.1: 00 00 || SSRC || ROC || SEQ, XORed with the session salt.
                let mut nonce = [0u8; 12];
                nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
                nonce[6..10].copy_from_slice(&roc.to_be_bytes());
                nonce[10..12].copy_from_slice(&seq.to_be_bytes());
                for (n, s) in nonce.iter_mut().zip(salt.iter()) {
                    *n ^= s;
                }
                buf.resize(len + 16, 0);
                let (packet, tag) = buf.split_at_mut(len);
                let (header, payload) = packet.split_at_mut(header_len);
                aead.seal_in_place(&nonce, header, payload, tag)?;
            }
            Cipher::Cm { ctr, mac, salt } => {
                // RFC 3711 §4.1.1: (salt · 2^16) XOR (SSRC · 2^64) XOR (index · 2^16).
                let mut iv = [0u8; 16];
                iv[..14].copy_from_slice(salt);
                for (i, b) in ssrc.to_be_bytes().into_iter().enumerate() {
                    iv[4 + i] ^= b;
                }
                for (i, b) in roc.to_be_bytes().into_iter().enumerate() {
                    iv[8 + i] ^= b;
                }
                for (i, b) in seq.to_be_bytes().into_iter().enumerate() {
                    iv[12 + i] ^= b;
                }
                ctr.apply_keystream(&iv, &mut buf[header_len..])?;
                let mut tag = [0u8; 20];
                mac.sign(&[&buf[..], &roc.to_be_bytes()], &mut tag)?;
                buf.extend_from_slice(&tag[..10]);
            }
        }
        Ok(())
    }
}

/// The length of the RTP header at the start of `b` (fixed part, CSRCs, extension block).
pub fn rtp_header_len(b: &[u8]) -> Option<usize> {
    if b.len() < 12 || b[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * usize::from(b[0] & 0x0F);
    if b[0] & 0x10 != 0 {
        let words = b.get(len + 2..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([words[0], words[1]]));
    }
    (len <= b.len()).then_some(len)
}

/// A crypto provider that passes everything to another one and notes the SRTP master keys rtc
/// derives session keys from (see the module docs). One per peer connection.
pub struct KeyCapture {
    crypto: CapturingCrypto,
}

struct CapturingCrypto {
    inner: Arc<dyn RTCCryptoProvider>,
    /// Distinct master keys in the order rtc first used them, each with its first block.
    /// Locked only while rtc derives keys (once per DTLS handshake), never per packet.
    keys: Mutex<Vec<MasterKey>>,
}

/// More master keys than a connection ever derives: the list stops growing here.
const MAX_KEYS: usize = 4;

impl KeyCapture {
    pub fn new(inner: Arc<dyn RTCCryptoProvider>) -> Self {
        Self {
            crypto: CapturingCrypto {
                inner,
                keys: Mutex::new(Vec::new()),
            },
        }
    }

    /// The connection's outbound master key, once rtc has derived both of its contexts.
    pub fn outbound(&self) -> Result<MasterKey, SrtpError> {
        // A poisoned lock only means a panic elsewhere while it was held: the list is intact.
        let keys = self
            .crypto
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match keys.as_slice() {
            [outbound, _inbound] => Ok(outbound.clone()),
            other => Err(SrtpError::KeysNotCaptured(other.len())),
        }
    }

    /// The crypto implementation rtc would have used (for [`SrtpSender::new`]).
    pub fn inner(&self) -> &dyn RTCCrypto {
        self.crypto.inner.crypto()
    }
}

impl RTCCryptoProvider for KeyCapture {
    fn name(&self) -> &'static str {
        "meridian-key-capture"
    }
    fn crypto(&self) -> &dyn RTCCrypto {
        &self.crypto
    }
    fn random(&self) -> &dyn RTCRandom {
        self.crypto.inner.random()
    }
}

impl RTCCrypto for CapturingCrypto {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner.crypto().supports(algorithm)
    }
    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }
    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        if let (BlockCipherAlgorithm::Aes128, Ok(k), Ok(b)) = (
            algorithm,
            <[u8; 16]>::try_from(key),
            <[u8; 16]>::try_from(&*block),
        ) {
            let mut keys = self
                .keys
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if keys.len() < MAX_KEYS && !keys.iter().any(|m| m.key == k) {
                keys.push(MasterKey {
                    key: k,
                    salt_block: b,
                });
            }
        }
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }
    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.crypto().new_hmac(algorithm, key)
    }
    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }
    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        self.inner.crypto().new_aead(algorithm, key)
    }
    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }
    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        self.inner.crypto().start_key_exchange(algorithm)
    }
    fn generate_signing_key(
        &self,
        scheme: SignatureScheme,
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }
    fn import_signing_key(
        &self,
        scheme: SignatureScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }
    fn verify_signature(
        &self,
        scheme: SignatureScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::srtp::context::Context;
    use rtc::srtp::protection_profile::ProtectionProfile;

    fn provider() -> Arc<dyn RTCCryptoProvider> {
        // The build enables rtc's ring provider; without it nothing here could run.
        rtc::crypto::default_provider().expect("rtc's default crypto provider")
    }

    fn master(profile: Profile) -> (MasterKey, Vec<u8>) {
        let key: [u8; 16] = std::array::from_fn(|i| 0x10 + i as u8);
        let salt: Vec<u8> = (0..profile.salt_len()).map(|i| 0xA0 + i as u8).collect();
        let mut salt_block = [0u8; 16];
        salt_block[..salt.len()].copy_from_slice(&salt);
        (MasterKey { key, salt_block }, salt)
    }

    fn rtc_profile(p: Profile) -> ProtectionProfile {
        match p {
            Profile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
            Profile::Aes128CmHmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        }
    }

    /// A packet with a one-byte-header extension block, as forwarded copies carry.
    fn packet(seq: u16, ssrc: u32, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::with_capacity(1500);
        b.extend_from_slice(&[0x90, 96]);
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&(u32::from(seq) * 3000).to_be_bytes());
        b.extend_from_slice(&ssrc.to_be_bytes());
        b.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0x31, 0xAB, 0xCD, 0]);
        b.extend_from_slice(payload);
        b
    }

    /// Both profiles, checked against rtc's own SRTP receiver: every packet decrypts to what
    /// was protected, across a sequence-number wrap, with a retransmission from before it.
    fn decrypts_at_rtc(profile: Profile) {
        let crypto = provider();
        let (m, salt) = master(profile);
        let mut sender = SrtpSender::new(profile, &m, crypto.crypto()).unwrap();
        let mut receiver = Context::new(
            &m.key,
            &salt,
            rtc_profile(profile),
            None,
            None,
            crypto.crypto(),
        )
        .unwrap();
        let seqs = (0xFFF0u16..=0xFFFF).chain(0..16);
        for (i, seq) in seqs.enumerate() {
            let payload: Vec<u8> = (0..200).map(|j| (i + j) as u8).collect();
            let plain = packet(seq, 0x1234_5678, &payload);
            let mut buf = plain.clone();
            sender.protect(&mut buf).unwrap();
            assert_eq!(buf.len(), plain.len() + profile.overhead());
            assert_ne!(&buf[20..plain.len()], &plain[20..], "payload encrypted");
            let clear = receiver.decrypt_rtp(&buf).unwrap();
            assert_eq!(&clear[..], &plain[..], "packet {i} (seq {seq})");
        }
    }

    #[test]
    fn aes_gcm_copies_decrypt_at_rtcs_receiver_across_a_sequence_wrap() {
        decrypts_at_rtc(Profile::AeadAes128Gcm);
    }

    #[test]
    fn aes_cm_hmac_sha1_80_copies_decrypt_at_rtcs_receiver_across_a_sequence_wrap() {
        decrypts_at_rtc(Profile::Aes128CmHmacSha1_80);
    }

    #[test]
    fn a_retransmission_from_before_a_wrap_is_byte_identical_to_the_original() {
        for profile in [Profile::AeadAes128Gcm, Profile::Aes128CmHmacSha1_80] {
            let crypto = provider();
            let (m, _) = master(profile);
            let mut sender = SrtpSender::new(profile, &m, crypto.crypto()).unwrap();
            let mut original = None;
            for seq in (0xFFF0u16..=0xFFFF).chain(0..8) {
                let mut buf = packet(seq, 7, &[seq as u8; 100]);
                sender.protect(&mut buf).unwrap();
                if seq == 0xFFFE {
                    original = Some(buf);
                }
            }
            let mut again = packet(0xFFFE, 7, &[0xFE; 100]);
            sender.protect(&mut again).unwrap();
            assert_eq!(Some(again), original, "{profile:?}");
        }
    }

    #[test]
    fn protecting_a_copy_in_a_buffer_with_room_does_not_reallocate() {
        let crypto = provider();
        for profile in [Profile::AeadAes128Gcm, Profile::Aes128CmHmacSha1_80] {
            let (m, _) = master(profile);
            let mut sender = SrtpSender::new(profile, &m, crypto.crypto()).unwrap();
            let mut buf = packet(1, 9, &[0; 1100]);
            let at = buf.as_ptr();
            sender.protect(&mut buf).unwrap();
            assert_eq!(buf.as_ptr(), at, "{profile:?}");
        }
    }

    #[test]
    fn garbage_is_refused_not_encrypted() {
        let crypto = provider();
        let (m, _) = master(Profile::AeadAes128Gcm);
        let mut sender = SrtpSender::new(Profile::AeadAes128Gcm, &m, crypto.crypto()).unwrap();
        for bad in [
            &[][..],
            &[0x80; 5],
            &[0x00; 40],
            &[
                0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE, 0xFF, 0xFF,
            ],
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(matches!(
                sender.protect(&mut buf),
                Err(SrtpError::Malformed)
            ));
        }
    }

    #[test]
    fn the_capture_hands_out_the_first_of_two_master_keys_with_its_salt() {
        let capture = KeyCapture::new(provider());
        assert!(matches!(
            capture.outbound(),
            Err(SrtpError::KeysNotCaptured(0))
        ));
        let profile = Profile::Aes128CmHmacSha1_80;
        let (local, _) = master(profile);
        let remote = MasterKey {
            key: [0x77; 16],
            salt_block: [0x55; 16],
        };
        // What rtc does on a DTLS handshake: derive the outbound context, then the inbound.
        for m in [&local, &remote] {
            SrtpSender::new(profile, m, capture.crypto()).unwrap();
        }
        assert!(capture.outbound().unwrap() == local);
    }
}
