"""1-minute OHLC candles per symbol in Spark Structured Streaming: the job
Sluice's pipelines/candles.toml replaces, on the same capture, for
scripts/bench-spark.sh.

Reads Finnhub frames (one JSON object per line) from a folder as a stream,
explodes the trades, and aggregates per (1-minute window of the trade time,
symbol): open and close by time (ties to the lowest open, the highest
close, as Sluice does), high, low, volume, VWAP and the trade count. Every
micro-batch's updated candles are appended to Parquet. `availableNow`
processes what the folder holds, then stops.

Usage: spark_candles.py INPUT_DIR OUTPUT_DIR [CORES]. Writes OUTPUT_DIR.result:
the trades counted, the candles, the query's seconds, and the CPU seconds of
the JVM and the driver up to the end of the query.
"""
import os
import resource
import sys
import time

from pyspark.sql import SparkSession, functions as F, types as T

source, out = sys.argv[1], sys.argv[2]
cores = sys.argv[3] if len(sys.argv) > 3 else "2"
spark = (
    SparkSession.builder.master(f"local[{cores}]")
    .appName("candles")
    .config("spark.sql.shuffle.partitions", cores)
    .config("spark.ui.enabled", "false")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("WARN")

trade = T.StructType(
    [
        T.StructField("s", T.StringType()),
        T.StructField("p", T.DoubleType()),
        T.StructField("t", T.LongType()),
        T.StructField("v", T.DoubleType()),
        T.StructField("c", T.ArrayType(T.StringType())),
    ]
)
frame = T.StructType([T.StructField("type", T.StringType()), T.StructField("data", T.ArrayType(trade))])

trades = (
    spark.readStream.schema(frame)
    .option("maxFilesPerTrigger", 1)
    .json(source)
    .where(F.col("type") == "trade")
    .select(F.explode("data").alias("d"))
    .select(
        F.col("d.s").alias("symbol"),
        F.col("d.p").alias("price"),
        F.col("d.v").alias("volume"),
        F.col("d.t").alias("t"),
        (F.col("d.t") / 1000).cast("timestamp").alias("ts"),
    )
)
candles = trades.groupBy(F.window("ts", "1 minute"), "symbol").agg(
    F.min_by("price", F.struct("t", "price")).alias("open"),
    F.max("price").alias("high"),
    F.min("price").alias("low"),
    F.max_by("price", F.struct("t", "price")).alias("close"),
    F.sum("volume").alias("volume"),
    (F.sum(F.col("price") * F.col("volume")) / F.sum("volume")).alias("vwap"),
    F.count(F.lit(1)).alias("trades"),
)


def write(batch, batch_id):
    batch.write.mode("append").parquet(out)


started = time.time()
query = (
    candles.writeStream.outputMode("update")
    .foreachBatch(write)
    .option("checkpointLocation", out + "_checkpoint")
    .trigger(availableNow=True)
    .start()
)
query.awaitTermination()
elapsed = time.time() - started
# The JVM's CPU (user + system, /proc/PID/stat, clock ticks) and this
# driver's, up to the end of the query.
jvm = spark.sparkContext._gateway.proc.pid
with open(f"/proc/{jvm}/stat") as stat:
    fields = stat.read().rsplit(")", 1)[1].split()
ticks = os.sysconf("SC_CLK_TCK")
me = resource.getrusage(resource.RUSAGE_SELF)
cpu = (int(fields[11]) + int(fields[12])) / ticks + me.ru_utime + me.ru_stime
rows = spark.read.parquet(out).groupBy("window", "symbol").agg(F.max("trades").alias("trades"))
total = rows.agg(F.sum("trades")).collect()[0][0]
with open(out + ".result", "w") as result:
    result.write(f"{total} {rows.count()} {elapsed:.2f} {cpu:.2f}\n")
spark.stop()
