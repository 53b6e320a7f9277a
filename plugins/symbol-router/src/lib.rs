//! Routes flattened trades (`{"symbol": …}`) to named sinks.
//!
//! Config `routes`: comma-separated `PATTERN=ROUTE` pairs, tried in order; a
//! trade whose symbol contains PATTERN goes to ROUTE, others to the default
//! sink. Example: `routes = "BTC=btc,ETH=eth"`.

use serde::Deserialize;
use sluice_plugin::{export_transform, Config, Output, Record, Transform};

pub struct SymbolRouter {
    routes: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    symbol: std::borrow::Cow<'a, str>,
}

impl Transform for SymbolRouter {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["routes"])?;
        let routes = config
            .get("routes")
            .ok_or("config `routes` is required, e.g. \"BTC=btc,ETH=eth\"")?
            .split(',')
            .map(|pair| match pair.trim().split_once('=') {
                Some((pattern, route)) if !pattern.is_empty() && !route.is_empty() => {
                    Ok((pattern.to_string(), route.to_string()))
                }
                _ => Err(format!("config `routes`: {pair:?} is not PATTERN=ROUTE")),
            })
            .collect::<Result<_, _>>()?;
        Ok(SymbolRouter { routes })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        let trade: Trade = serde_json::from_slice(&record.value).map_err(|e| format!("not a flattened trade: {e}"))?;
        let route =
            self.routes.iter().find(|(pattern, _)| trade.symbol.contains(pattern.as_str())).map(|(_, r)| r.clone());
        let key = trade.symbol.as_bytes().to_vec();
        let mut out = Output::new(record.value).with_key(key);
        out.timestamp = record.timestamp;
        out.headers = record.headers;
        out.route = route;
        Ok(vec![out])
    }
}

export_transform!(SymbolRouter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_first_matching_pattern() {
        let config: Config = [("routes", "BTC=btc, ETH=eth")].into_iter().collect();
        let mut router = SymbolRouter::init(&config).unwrap();
        let mut route =
            |s: &str| router.process(Record::from_value(format!(r#"{{"symbol":"{s}"}}"#))).unwrap()[0].route.clone();
        assert_eq!(route("BINANCE:BTCUSDT"), Some("btc".into()));
        assert_eq!(route("BINANCE:ETHUSDT"), Some("eth".into()));
        assert_eq!(route("AAPL"), None);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(SymbolRouter::init(&Config::default()).is_err());
        assert!(SymbolRouter::init(&[("routes", "BTC")].into_iter().collect()).is_err());
    }
}
