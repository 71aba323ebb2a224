//! GeoIP: an address to a place (coordinates, country, continent) through a MaxMind DB City
//! database. Production nodes read a GeoLite2/GeoIP2 City file; development and tests use a
//! database built in memory from a checked-in table (`regions/geoip-dev.csv`), so no MaxMind
//! licence is needed to run Meridian.

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use maxminddb_writer::paths::IpAddrWithMask;
use serde::Serialize;

use crate::cidr::Cidr;

/// Where an address is, as far as the database knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub latitude: f64,
    pub longitude: f64,
    /// ISO 3166-1 alpha-2, e.g. `IN`.
    pub country: Option<String>,
    /// MaxMind continent code: AF, AN, AS, EU, NA, OC, SA.
    pub continent: Option<String>,
    /// English city name, when the database has one.
    pub city: Option<String>,
}

/// Why a GeoIP database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot open GeoIP database {path}: {source} (check routing.geoip_file)")]
    Open {
        path: String,
        source: maxminddb::MaxMindDbError,
    },
    #[error("GeoIP database {path} is not a City database (database_type {kind:?}); use GeoLite2-City or GeoIP2-City")]
    NotCity { path: String, kind: String },
    #[error("GeoIP table line {line}: {reason}")]
    Table { line: usize, reason: String },
    #[error("cannot build the GeoIP database: {0}")]
    Build(String),
}

/// The development table, compiled in.
pub const DEV_TABLE: &str = include_str!("../../regions/geoip-dev.csv");

/// A City database in memory.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
    /// Where it came from, for logs and `/metrics`.
    pub source: String,
}

impl GeoDb {
    /// Opens a MaxMind DB City file (GeoLite2-City.mmdb, GeoIP2-City.mmdb).
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let kind = reader.metadata().database_type.clone();
        if !kind.contains("City") {
            return Err(GeoError::NotCity {
                path: path.display().to_string(),
                kind,
            });
        }
        Ok(GeoDb {
            reader,
            source: path.display().to_string(),
        })
    }

    /// Builds a City database from a table (see [`parse_table`]).
    pub fn from_table(text: &str, origin: &str) -> Result<GeoDb, GeoError> {
        let rows = parse_table(text)?;
        let bytes = build_city_db(&rows)?;
        let reader = maxminddb::Reader::from_source(bytes).map_err(|source| GeoError::Open {
            path: origin.to_string(),
            source,
        })?;
        Ok(GeoDb {
            reader,
            source: origin.to_string(),
        })
    }

    /// The compiled-in development database.
    pub fn dev() -> GeoDb {
        // The table is checked in and parsed by a unit test, so building it cannot fail.
        GeoDb::from_table(DEV_TABLE, "built-in development table")
            .expect("the checked-in development GeoIP table is valid")
    }

    /// The place of `ip`, or `None` when the database has no coordinates for it (private,
    /// reserved and unallocated addresses never do).
    pub fn lookup(&self, ip: IpAddr) -> Option<Place> {
        let found = self.reader.lookup(crate::cidr::normalize(ip)).ok()?;
        let city: maxminddb::geoip2::City = found.decode().ok()??;
        let latitude = city.location.latitude?;
        let longitude = city.location.longitude?;
        Some(Place {
            latitude,
            longitude,
            country: city.country.iso_code.map(str::to_string),
            continent: city.continent.code.map(str::to_string),
            city: city.city.names.english.map(str::to_string),
        })
    }
}

/// One row of a GeoIP table: a network and the place it is in.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoRow {
    pub network: Cidr,
    pub city: String,
    pub country: String,
    pub continent: String,
    pub latitude: f64,
    pub longitude: f64,
}

/// Parses `network,city,country,continent,latitude,longitude` lines; `#` starts a comment.
pub fn parse_table(text: &str) -> Result<Vec<GeoRow>, GeoError> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| GeoError::Table {
            line: i + 1,
            reason,
        };
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [network, city, country, continent, lat, lon] = f[..] else {
            return Err(bad(format!(
                "expected 6 comma-separated fields (network,city,country,continent,latitude,longitude), found {}",
                f.len()
            )));
        };
        let network = Cidr::from_str(network).map_err(|e| bad(e.to_string()))?;
        let latitude: f64 = lat
            .parse()
            .ok()
            .filter(|v: &f64| (-90.0..=90.0).contains(v))
            .ok_or_else(|| bad(format!("latitude {lat:?} is not a number in -90..=90")))?;
        let longitude: f64 = lon
            .parse()
            .ok()
            .filter(|v: &f64| (-180.0..=180.0).contains(v))
            .ok_or_else(|| bad(format!("longitude {lon:?} is not a number in -180..=180")))?;
        if country.len() != 2 || continent.len() != 2 {
            return Err(bad(
                "country (ISO 3166-1 alpha-2) and continent (AF AN AS EU NA OC SA) are two letters"
                    .into(),
            ));
        }
        rows.push(GeoRow {
            network,
            city: city.to_string(),
            country: country.to_ascii_uppercase(),
            continent: continent.to_ascii_uppercase(),
            latitude,
            longitude,
        });
    }
    Ok(rows)
}

/// The subset of the GeoIP2 City record shape Meridian reads.
#[derive(Serialize)]
struct CityRecord<'a> {
    city: Names<'a>,
    continent: Code<'a>,
    country: Iso<'a>,
    location: Location,
}
#[derive(Serialize)]
struct Names<'a> {
    names: English<'a>,
}
#[derive(Serialize)]
struct English<'a> {
    en: &'a str,
}
#[derive(Serialize)]
struct Code<'a> {
    code: &'a str,
}
#[derive(Serialize)]
struct Iso<'a> {
    iso_code: &'a str,
}
#[derive(Serialize)]
struct Location {
    latitude: f64,
    longitude: f64,
    accuracy_radius: u16,
}

/// Writes rows as an IPv6 MaxMind DB City database (IPv4 networks under `::/96`, where
/// readers look IPv4 addresses up).
pub fn build_city_db(rows: &[GeoRow]) -> Result<Vec<u8>, GeoError> {
    let mut db = maxminddb_writer::Database::default();
    db.metadata.ip_version = maxminddb_writer::metadata::IpVersion::V6;
    db.metadata.database_type = "Meridian-Dev-City".into();
    db.metadata.binary_format_major_version = 2;
    db.metadata
        .description
        .insert("en".into(), "Meridian development City database".into());
    db.metadata.languages = vec!["en".into()];
    // Broader networks first, so a more specific one inside them always wins, whatever the
    // table's order.
    let mut ordered: Vec<&GeoRow> = rows.iter().collect();
    // (IPv4 networks live under ::/96, so their depth in the tree is 96 more.)
    ordered.sort_by_key(|r| match r.network.addr {
        IpAddr::V4(_) => r.network.prefix + 96,
        IpAddr::V6(_) => r.network.prefix,
    });
    for row in ordered {
        let data = db
            .insert_value(CityRecord {
                city: Names {
                    names: English { en: &row.city },
                },
                continent: Code {
                    code: &row.continent,
                },
                country: Iso {
                    iso_code: &row.country,
                },
                location: Location {
                    latitude: row.latitude,
                    longitude: row.longitude,
                    accuracy_radius: 50,
                },
            })
            .map_err(|e| GeoError::Build(e.to_string()))?;
        let (addr, mask) = match row.network.addr {
            IpAddr::V4(v4) => (IpAddr::V6(v4.to_ipv6_compatible()), row.network.prefix + 96),
            v6 => (v6, row.network.prefix),
        };
        db.insert_node(IpAddrWithMask::new(addr, mask), data);
    }
    let mut out = Vec::new();
    db.write_to(&mut out)
        .map_err(|e| GeoError::Build(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_table_parses_and_places_documentation_addresses() {
        let db = GeoDb::dev();
        let mumbai = db.lookup("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(mumbai.country.as_deref(), Some("IN"));
        assert_eq!(mumbai.continent.as_deref(), Some("AS"));
        assert_eq!(mumbai.city.as_deref(), Some("Mumbai"));
        assert!((mumbai.latitude - 19.08).abs() < 0.1);
        let v6 = db.lookup("2001:db8:4::1".parse().unwrap()).unwrap();
        assert_eq!(v6.country.as_deref(), Some("DE"));
        // An IPv4-mapped IPv6 address (a dual-stack socket) finds the IPv4 record.
        let mapped = db.lookup("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(mapped.city.as_deref(), Some("Mumbai"));
    }

    #[test]
    fn private_and_unlisted_addresses_have_no_place() {
        let db = GeoDb::dev();
        for ip in ["10.1.2.3", "192.168.1.1", "127.0.0.1", "8.8.8.8", "fd00::1"] {
            assert_eq!(db.lookup(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn table_errors_name_the_line() {
        let err = parse_table("# header\n192.0.2.0/24,Mumbai,IN,AS,19.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_table("192.0.2.0/33,Mumbai,IN,AS,19.0,72.8\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("prefix"), "{err}");
        let err = parse_table("192.0.2.0/24,Mumbai,IN,AS,95.0,72.8\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("latitude"), "{err}");
    }

    #[test]
    fn the_most_specific_network_wins_whatever_the_table_order() {
        for text in [
            "198.51.0.0/16,Madrid,ES,EU,40.4,-3.7\n198.51.100.0/24,Paris,FR,EU,48.8,2.3\n",
            "198.51.100.0/24,Paris,FR,EU,48.8,2.3\n198.51.0.0/16,Madrid,ES,EU,40.4,-3.7\n",
            "198.51.0.0/16,Madrid,ES,EU,40.4,-3.7\n::/0,Lagos,NG,AF,6.5,3.4\n198.51.100.0/24,Paris,FR,EU,48.8,2.3\n",
        ] {
            let db = GeoDb::from_table(text, "test").unwrap();
            let inner = db.lookup("198.51.100.1".parse().unwrap()).unwrap();
            let outer = db.lookup("198.51.1.1".parse().unwrap()).unwrap();
            assert_eq!(inner.city.as_deref(), Some("Paris"), "{text}");
            assert_eq!(outer.city.as_deref(), Some("Madrid"), "{text}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_city_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.mmdb");
        std::fs::write(&path, b"not a database").unwrap();
        let err = GeoDb::open(&path).err().unwrap().to_string();
        assert!(err.contains("routing.geoip_file"), "{err}");
    }
}
