//! The faults the client injects, chosen from the seed, and the seeded random numbers.

use axum::http::HeaderMap;

/// A fault the client asks the server to stage, in the `X-Fault` request field (read by this
/// example only). The layer does not fingerprint it, so every attempt of a request is the same
/// request to the layer, whatever its fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    /// The handler waits after charging, longer than the client's timeout.
    Slow,
    /// The payment gateway answers 503 before charging.
    GatewayDown,
    /// The response is replaced by a 502 after the handler ran.
    BadGateway,
    /// The connection drops in the middle of the response, after the handler ran.
    Dropped,
}

impl Fault {
    pub(crate) const FIELD: &str = "x-fault";
    pub(crate) const ALL: [Fault; 5] = [
        Self::None,
        Self::Slow,
        Self::GatewayDown,
        Self::BadGateway,
        Self::Dropped,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Slow => "slow",
            Self::GatewayDown => "gateway-down",
            Self::BadGateway => "bad-gateway",
            Self::Dropped => "drop-connection",
        }
    }

    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let name = headers.get(Self::FIELD).and_then(|v| v.to_str().ok());
        Self::ALL
            .into_iter()
            .find(|fault| Some(fault.name()) == name)
            .unwrap_or(Self::None)
    }

    /// The fault for one attempt: the first attempt meets one half the time, later ones a
    /// quarter of the time, so every request gets through in the end.
    pub(crate) fn pick(seed: u64, customer: usize, click: usize, attempt: u32) -> Self {
        let roll = Rng::new(seed, &[customer as u64, click as u64, attempt.into()]).below(100);
        let roll = if attempt == 1 { roll } else { roll * 2 };
        match roll {
            0..14 => Self::Slow,
            14..26 => Self::GatewayDown,
            26..38 => Self::BadGateway,
            38..50 => Self::Dropped,
            _ => Self::None,
        }
    }
}

/// splitmix64 from a seed and a path: the same stream on every platform and in every order.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64, path: &[u64]) -> Self {
        let mut rng = Self(seed);
        for &step in path {
            rng.0 = rng.next() ^ step;
        }
        rng
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
